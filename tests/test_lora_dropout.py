"""LoRA Dropout's masks on a PEFT LoRA layer, checked against the paper's math: masked dims get exactly zero
gradient, ΔW is zero with probability 2p − p², p = 0 is plain LoRA, the ensemble mean approaches (1−p)²·BA, merging
uses that expectation (a plain merge is refused), and the settings round-trip through a saved adapter."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from llmreg.lora_dropout import LoRADropoutConfig, attach_lora_dropout, merge_and_unload


IN, OUT, RANK = 48, 64, 8


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(IN, OUT, bias=False)

    def forward(self, x):
        return self.proj(x)


def lora_model(seed: int = 0):
    torch.manual_seed(seed)
    model = get_peft_model(Linear(), LoraConfig(r=RANK, lora_alpha=16, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # PEFT starts B at 0; a trained B is not
    return model, layer


def delta_w(model, layer) -> torch.Tensor:
    """ΔW as the model applies it in this forward: its LoRA output on the basis vectors (one batch, so one mask)."""
    with torch.no_grad():
        return (model(torch.eye(IN)) - layer.base_layer(torch.eye(IN))).T


def dense_delta(layer) -> torch.Tensor:
    return layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight


def config(p: float, **kwargs) -> LoRADropoutConfig:
    return LoRADropoutConfig(lora_dropout_p=p, **kwargs)


def test_masked_dimensions_get_exactly_zero_gradient():
    model, layer = lora_model()
    dropout = attach_lora_dropout(model, config(0.5))
    masks = []
    original = dropout._mask
    dropout._mask = lambda module, reference: masks.append(original(module, reference)) or masks[-1]
    model.train()
    model(torch.randn(5, 7, IN)).square().sum().backward()
    input_mask, output_mask = masks[0].flatten(), masks[1].flatten()
    a_grad, b_grad = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
    assert 0 < input_mask.sum() < IN and 0 < output_mask.sum() < OUT
    assert torch.all(a_grad[:, input_mask == 0] == 0) and torch.all(a_grad[:, input_mask == 1].abs().sum(0) > 0)
    assert torch.all(b_grad[output_mask == 0] == 0) and torch.all(b_grad[output_mask == 1].abs().sum(1) > 0)


def test_the_zero_fraction_of_delta_w_is_2p_minus_p_squared():
    model, layer = lora_model()
    attach_lora_dropout(model, config(0.3))
    model.train()
    zeros = torch.stack([(delta_w(model, layer) == 0).float().mean() for _ in range(400)]).mean()
    assert zeros.item() == pytest.approx(2 * 0.3 - 0.3**2, abs=0.01)  # 0.51


def test_p_zero_is_plain_lora_exactly():
    x = torch.randn(3, 5, IN)
    plain, _ = lora_model()
    hooked, _ = lora_model()
    attach_lora_dropout(hooked, config(0.0))
    for model in (plain, hooked):
        model.train()
        model(x).square().sum().backward()
    for a, b in zip(plain.parameters(), hooked.parameters()):
        assert torch.equal(a, b) and (a.grad is None) == (b.grad is None)
        assert a.grad is None or torch.equal(a.grad, b.grad)


def test_one_mask_per_batch_or_per_example():
    x = torch.randn(1, 1, IN).expand(6, 3, IN)  # six identical examples of three identical tokens
    for per_example in (False, True):
        model, _ = lora_model()
        attach_lora_dropout(model, config(0.5, lora_dropout_per_example=per_example))
        model.train()
        torch.manual_seed(1)
        out = model(x)
        assert torch.equal(out[:, 0], out[:, 2])  # tokens of one example always share the mask
        assert torch.equal(out[0], out[5]) != per_example


def test_the_ensemble_mean_approaches_the_expected_update_which_eval_and_merge_compute_exactly():
    p = 0.4
    model, layer = lora_model()
    expected = (1 - p) ** 2 * dense_delta(layer)
    dropout = attach_lora_dropout(model, config(p))
    model.eval()
    torch.testing.assert_close(delta_w(model, layer), expected.detach(), rtol=1e-5, atol=1e-5)  # one eval pass
    with dropout.ensemble():
        draws = torch.stack([delta_w(model, layer) for _ in range(4000)])
    error = (draws.mean(0) - expected).abs().max() / expected.abs().max()
    assert error < 0.05 and (draws.std(0).max() > 0.1)  # random per draw, right on average

    weight = layer.base_layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"expected update is \(1−p\)²·B·A"):
        model.merge_and_unload()
    merged = merge_and_unload(model, dropout)
    torch.testing.assert_close(merged.proj.weight, weight + expected.detach(), rtol=1e-5, atol=1e-5)


def test_settings_round_trip_with_a_saved_adapter(tmp_path):
    model, layer = lora_model()
    settings = config(0.2, lora_dropout_train_samples=2, lora_dropout_eval_samples=4, lora_dropout_per_example=True)
    attach_lora_dropout(model, settings)
    model.save_pretrained(tmp_path)
    settings.save(tmp_path)
    x = torch.randn(2, IN)
    model.eval()
    before = model(x)

    loaded = PeftModel.from_pretrained(Linear(), tmp_path)
    loaded.base_model.model.proj.base_layer.load_state_dict(layer.base_layer.state_dict())
    reloaded = LoRADropoutConfig.load(tmp_path)
    assert reloaded == settings
    attach_lora_dropout(loaded, reloaded)
    loaded.eval()
    torch.testing.assert_close(loaded(x), before)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"lora_dropout_p": 1.0}, r"rate in \[0, 1\)"),
    ({"lora_dropout_train_samples": 0}, "lora_dropout_train_samples must be >= 1"),
])
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        LoRADropoutConfig(**overrides)


def test_a_model_without_lora_or_with_dora_is_refused():
    with pytest.raises(ValueError, match="has none: pass a peft_config"):
        attach_lora_dropout(Linear(), config(0.1))
    dora = get_peft_model(Linear(), LoraConfig(r=4, target_modules=["proj"], use_dora=True))
    with pytest.raises(ValueError, match="does not support DoRA"):
        attach_lora_dropout(dora, config(0.1))
