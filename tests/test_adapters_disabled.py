"""trainer_utils.adapters_disabled: the base model as PEFT's own ``disable_adapter`` gives it (bit for bit), the
adapter back afterwards with the same outputs and the same trainable parameters, layers disabled before staying so,
and the adapter restored when the block raises. The oracle is ``PeftModel.disable_adapter``."""

import pytest
import torch
from helpers import small_lora
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from llmreg.trainer_utils import adapter_layers, adapters_disabled


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lora_model(lab_model_dir, **extra):
    config = small_lora()
    for key, value in extra.items():
        setattr(config, key, value)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(lab_model_dir), config)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def trainable(model):
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_it_is_peft_disable_adapter_and_the_adapter_comes_back(lab_model_dir, modules_to_save):
    model = lora_model(lab_model_dir, modules_to_save=modules_to_save)
    if modules_to_save:  # a trained copy of the head, which disabling must set aside too
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(0.1)
    ids = torch.arange(3, 19).reshape(2, 8)
    adapted, names = logits(model, ids), trainable(model)
    with model.disable_adapter():
        oracle = logits(model, ids)
    assert (adapted - oracle).abs().max() > 1e-3  # the adapter changes the outputs
    layers = adapter_layers(model)
    assert len(layers) >= 8  # q_proj and v_proj in each of the 4 layers, plus the head's wrapper when saved
    with adapters_disabled(layers):
        assert torch.equal(logits(model, ids), oracle)
    assert torch.equal(logits(model, ids), adapted)
    assert trainable(model) == names


def test_layers_disabled_before_stay_disabled_and_an_error_restores_the_rest(lab_model_dir):
    model = lora_model(lab_model_dir)
    layers = adapter_layers(model)
    layers[0].enable_adapters(False)
    with pytest.raises(RuntimeError, match="inside"), adapters_disabled(layers):
        assert all(layer.disable_adapters for layer in layers)
        raise RuntimeError("inside")
    assert layers[0].disable_adapters and not any(layer.disable_adapters for layer in layers[1:])
