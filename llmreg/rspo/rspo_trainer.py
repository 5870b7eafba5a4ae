"""RSPOTrainer: TRL's DPOTrainer with SPPO's soft-probability loss plus RSPO's reference regularizers.

Tokenization, collation, the reference (π_t) log-prob precompute and the Trainer loop stay TRL's. What differs:
the win-probability and base-model columns travel through collation, the base model μ is scored once before
training (``precompute_base_log_probs``) and freed, and ``_compute_loss`` calls the pure losses of
``llmreg.losses.selfplay``:

    L = mean_i SPPO_i(θ; π_t) + Σ_k λ_k [ mean_i R̂_k(y_w,i) + mean_i R̂_k(y_l,i) ]
"""

import logging
from typing import ClassVar

import torch

from llmreg._compat import prepare_dataset
from llmreg.losses.selfplay import rspo_regularizer, rspo_regularizer_sum, sppo_loss
from llmreg.preference_utils import BASE_SAMPLE_PREFIX, PrecomputedColumnsDPOTrainer
from llmreg.rspo.rspo_config import RSPOConfig
from llmreg.trainer_utils import check_dataset_columns


logger = logging.getLogger(__name__)

WIN_PROBABILITY_COLUMNS = {"soft": ("chosen_probs_win", "chosen_probs_lose"), "single": ("chosen_probs",), "hard": ()}
BASE_COLUMNS = ("base_chosen_logps", "base_rejected_logps")


class RSPOTrainer(PrecomputedColumnsDPOTrainer):
    """SPPO/RSPO on preference pairs scored against π_t (https://huggingface.co/papers/2503.00030).

    The dataset has `prompt`, `chosen` (the winner y_w), `rejected` (the loser y_l), sampled from π_t (the model
    being trained, at its initial weights), and the win probabilities of ``sppo_variant`` (SPPO's columns
    `chosen_probs_win`, `chosen_probs_lose`, `chosen_probs`). `llmreg.selfplay` builds such datasets.

    >>> from llmreg.rspo import RSPOConfig, RSPOTrainer
    >>> args = RSPOConfig("outputs/rspo", regularizers="reverse_kl=0.5", base_model_name_or_path="base/model")
    >>> trainer = RSPOTrainer("iter1/model", args=args, train_dataset=pairs)
    >>> trainer.train()
    """

    _tag_names: ClassVar[list[str]] = ["trl", "sppo", "rspo", "llmreg"]
    _name = "RSPO"
    _paper: ClassVar[dict] = {
        "title": "RSPO: Regularized Self-Play Alignment of Large Language Models",
        "id": "2503.00030",
        "citation": "@article{tang2025rspo,\n  title={RSPO: Regularized Self-Play Alignment of Large Language "
                    "Models},\n  author={Tang, Xiaohang and Yoon, Sangwoong and Son, Seongho and Yuan, Huizhuo and "
                    "Gu, Quanquan and Bogunovic, Ilija},\n  journal={arXiv preprint arXiv:2503.00030},\n  "
                    "year={2025}\n}",
    }

    def __init__(self, model, ref_model=None, args: RSPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path
            args = RSPOConfig(f"{name.split('/')[-1]}-RSPO")
        if not isinstance(args, RSPOConfig):
            raise TypeError(f"RSPOTrainer needs an RSPOConfig, got {type(args).__name__}: the SPPO and regularizer "
                            "fields (sppo_variant, regularizers, base_model_name_or_path, ...) live there.")
        self.extra_columns = (*WIN_PROBABILITY_COLUMNS[args.sppo_variant], *BASE_COLUMNS)
        for name, dataset in {"train_dataset": train_dataset, "eval_dataset": eval_dataset}.items():
            if dataset is not None:
                self._check_columns(dataset, args, name)
        self.pair_regularizers = {k: w for k, w in args.regularizers.items() if k != "forward_kl_samples"}
        super().__init__(model, ref_model=ref_model, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, **kwargs)
        self.wrap_collator()
        self.setup_base_model(needed=bool(self.pair_regularizers))
        if "forward_kl_samples" in args.regularizers:
            self.train_dataset = self._with_base_sample_ids(self.train_dataset)
            if self.eval_dataset is not None:
                self.eval_dataset = self._with_base_sample_ids(self.eval_dataset)

    @staticmethod
    def _check_columns(dataset, args: RSPOConfig, name: str) -> None:
        required = ("prompt", "chosen", "rejected", *WIN_PROBABILITY_COLUMNS[args.sppo_variant])
        if "forward_kl_samples" in args.regularizers:
            required += ("base_completion",)
        if isinstance(dataset, dict):
            for key, split in dataset.items():
                check_dataset_columns(split, {f"RSPO ({args.sppo_variant})": required}, f"RSPO {name}[{key!r}]")
        else:
            check_dataset_columns(dataset, {f"RSPO ({args.sppo_variant})": required}, f"RSPO {name}")

    def _with_base_sample_ids(self, dataset):
        """Tokenize `base_completion` exactly as TRL tokenizes `chosen` (chat template, EOS): as a chosen column.

        The sample keeps the prompt ids of its own tokenization (`base_prompt_ids`): TRL ends the prompt where the
        tokens of the prompt alone and of prompt + response diverge, which depends on the response (its first
        characters can merge with the prompt's last token, e.g. a plain prompt ending with a space), so the pair's
        `prompt_ids` + the sample's ids could drop or repeat a token at the boundary.
        """
        if isinstance(dataset, dict):
            return {key: self._with_base_sample_ids(split) for key, split in dataset.items()}
        columns = ("base_prompt_ids", "base_completion_ids")
        if set(columns) <= set(dataset.column_names):
            return dataset
        dataset = dataset.remove_columns([column for column in columns if column in dataset.column_names])
        pairs = dataset.select_columns(["prompt", "base_completion"]).rename_column("base_completion", "chosen")
        pairs = pairs.add_column("rejected", pairs["chosen"])
        tokenized = prepare_dataset(self, pairs, self.processing_class, self.args, "base samples")
        if len(tokenized) != len(dataset):
            raise ValueError("Some base_completion rows were filtered out by max_length; raise max_length or drop "
                             "those rows so that every pair keeps its base-model sample.")
        dataset = dataset.add_column("base_prompt_ids", list(tokenized["prompt_ids"]))
        return dataset.add_column("base_completion_ids", list(tokenized["chosen_ids"]))

    def _compute_loss(self, model, inputs, return_outputs=False):
        args = self.args
        mode = "train" if self.model.training else "eval"
        logps, outputs = self.policy_sequence_logps(model, inputs)
        chosen_logps, rejected_logps = logps.chunk(2)
        iter_chosen, iter_rejected = self.iterate_logps(inputs)
        columns = WIN_PROBABILITY_COLUMNS[args.sppo_variant]
        p_win = inputs[columns[0]] if columns else None
        p_lose = inputs[columns[1]] if len(columns) > 1 else None
        sppo = sppo_loss(chosen_logps, rejected_logps, iter_chosen, iter_rejected, p_win, p_lose, eta=1.0 / args.beta,
                         variant=args.sppo_variant)
        loss = sppo.mean()
        metrics = {"sppo/loss": sppo, "logps/chosen": chosen_logps, "logps/rejected": rejected_logps,
                   "logratio_iterate/chosen": chosen_logps - iter_chosen,
                   "logratio_iterate/rejected": rejected_logps - iter_rejected}

        if self.pair_regularizers:
            base_chosen, base_rejected = self.base_logps(inputs, iter_chosen, iter_rejected)
            total_chosen, terms_chosen = rspo_regularizer_sum(self.pair_regularizers, chosen_logps, base_chosen,
                                                              is_clip=args.is_clip)
            total_rejected, terms_rejected = rspo_regularizer_sum(self.pair_regularizers, rejected_logps,
                                                                  base_rejected, is_clip=args.is_clip)
            loss = loss + total_chosen.mean() + total_rejected.mean()  # summed over w and l, as the official code
            metrics.update({f"reg/{kind}": terms_chosen[kind] + terms_rejected[kind] for kind in terms_chosen})
            metrics["logratio_base/chosen"] = chosen_logps - base_chosen
            metrics["logratio_base/rejected"] = rejected_logps - base_rejected
        if "forward_kl_samples" in args.regularizers:
            sample_logps, _ = self.policy_sequence_logps(model, inputs, prefix=BASE_SAMPLE_PREFIX)
            # ℓ_μ is a constant of the gradient; without it the value is the cross-entropy, logged as such.
            cross_entropy = rspo_regularizer(sample_logps, torch.zeros_like(sample_logps), kind="forward_kl_samples")
            loss = loss + args.regularizers["forward_kl_samples"] * cross_entropy.mean()
            metrics["reg/forward_kl_samples_cross_entropy"] = cross_entropy
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss

        if args.sppo_variant != "hard":
            metrics["sppo/target_chosen"] = (p_win - 0.5) / args.beta
            if args.sppo_variant == "soft":
                metrics["sppo/target_rejected"] = (p_lose - 0.5) / args.beta
        self.log_batch_means(mode, metrics)
        if return_outputs:
            return loss, outputs
        return loss
