"""The two ways masks apply (compressors/_masks.py): a forward-pre hook, or in place. In place must
train the same weights as the hook, keep the same checkpoint keys, and make the same final model."""

import copy

import pytest
import torch
from torch import nn

from effml.compressors._masks import (
    in_place,
    make_permanent,
    mask_gradients,
    mask_layers,
    reapply_masks,
    refresh_masked_weights,
    set_mask,
)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def masked(model: nn.Module, in_place_masks: bool) -> dict[str, nn.Module]:
    layers = mask_layers(model, ["Linear"], [], "test", in_place_masks)
    generator = torch.Generator().manual_seed(1)
    for module in layers.values():
        set_mask(module, (torch.rand(module.weight_mask.shape, generator=generator) > 0.6).float())
    return layers


def train(model: nn.Module, layers: dict[str, nn.Module], clip: float | None, steps: int = 5) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x, y = torch.randn(8, 12, generator=generator), torch.randint(0, 4, (8,), generator=generator)
        nn.functional.cross_entropy(model(x), y).backward()
        if clip:  # as effml's compressors do under trainer.gradient_clip_val (on_before_optimizer_step)
            mask_gradients(layers)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        reapply_masks(layers)  # what the compressors' on_train_batch_end does
        optimizer.zero_grad()


@pytest.mark.parametrize("clip", [None, 0.1])
def test_in_place_masks_train_the_same_weights_as_the_hook(clip):
    hooked, fused = mlp(), mlp()
    hooked_layers, fused_layers = masked(hooked, False), masked(fused, True)
    train(hooked, hooked_layers, clip)
    train(fused, fused_layers, clip)
    for name, module in fused_layers.items():
        reference = hooked_layers[name]
        assert in_place(module) and not in_place(reference) and not module._forward_pre_hooks
        assert module.weight is module.weight_orig  # the forward uses the parameter: no product
        assert torch.equal(module.weight, reference.weight_orig * reference.weight_mask)
    assert list(fused.state_dict()) == list(hooked.state_dict())  # checkpoints keep their keys
    x = torch.randn(3, 12)
    assert torch.equal(fused(x), hooked(x))
    make_permanent(hooked_layers)
    make_permanent(fused_layers)
    assert sorted(fused.state_dict()) == sorted(hooked.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for a, b in zip(fused.parameters(), hooked.parameters(), strict=True):
        assert torch.equal(a, b)


def test_without_reapplying_the_step_moves_pruned_weights():
    """The test above can fail: without reapply_masks an optimizer step leaves pruned entries nonzero."""
    model = mlp()
    layers = masked(model, True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    nn.functional.cross_entropy(model(torch.randn(8, 12)), torch.randint(0, 4, (8,))).backward()
    optimizer.step()
    module = layers["0"]
    assert (module.weight[module.weight_mask == 0] != 0).any()
    reapply_masks(layers)
    assert not (module.weight[module.weight_mask == 0] != 0).any()


def test_in_place_masks_survive_deepcopy_and_a_checkpoint_of_stale_values():
    model = mlp()
    layers = masked(model, True)
    twin = copy.deepcopy(model)
    assert twin[0].weight is twin[0].weight_orig and twin[0].weight is not model[0].weight
    # a checkpoint written with the hook keeps trained values under the mask: loading zeroes them
    hooked = mlp()
    masked(hooked, False)
    model.load_state_dict(hooked.state_dict())
    refresh_masked_weights(model)
    assert torch.equal(layers["0"].weight, hooked[0].weight_orig * hooked[0].weight_mask)
