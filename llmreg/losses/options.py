"""The one check every loss option goes through: an unknown name is an error that lists the valid ones."""


def check_option(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"Unknown {name} {value!r}; valid values: {', '.join(valid)}.")
