"""Hooks that move or recast weights: found on a module or below it, and run where a method skips ``forward``."""

import torch
from accelerate import cpu_offload, cpu_offload_with_hook

from omniportrait.models.offload import has_offload_hooks, has_offload_hooks_below, input_device, run_offload_hook


def layers() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))


def test_a_hook_on_the_module_itself_is_not_one_below_it():
    whole, by_layer, plain = layers(), layers(), layers()
    cpu_offload_with_hook(whole, execution_device=torch.device("meta"))  # model offload: the module itself
    cpu_offload(by_layer, execution_device=torch.device("cpu"))  # sequential offload: every layer
    assert has_offload_hooks(whole) and not has_offload_hooks_below(whole)
    assert has_offload_hooks(by_layer) and has_offload_hooks_below(by_layer)
    assert not has_offload_hooks(plain) and not has_offload_hooks_below(plain)


def test_the_offload_hook_moves_the_module_to_its_execution_device():
    module = layers()
    run_offload_hook(module)  # no hook: nothing happens
    assert module[0].weight.device.type == "cpu"
    cpu_offload_with_hook(module, execution_device=torch.device("meta"))
    run_offload_hook(module)
    assert module[0].weight.device.type == "meta"


def test_inputs_go_to_the_execution_device_only_where_hooks_move_the_weights_there():
    hooked, left_alone, execution = layers(), layers(), torch.device("meta")
    cpu_offload(hooked, execution_device=execution)
    assert input_device(hooked, execution) == execution
    assert input_device(left_alone, execution) == torch.device("cpu")
