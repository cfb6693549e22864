"""CUDA graphs (`ditmesh.parallel.graphs`): which calls are graphed, and the wrapper's transparency.

The capture and replay themselves need a GPU: tests/test_gpu.py checks them (graphed compiled
tiny FLUX with the sequence-parallel wrappers == eager for new inputs at every replay; an NCCL
collective captured in a graph). Here, on CPU: calls that cannot be graphed pass through
unchanged, and the wrapper stands in for the denoiser.
"""

from __future__ import annotations

import torch

from ditmesh.models.tiny import flux_transformer_inputs, tiny_flux_transformer
from ditmesh.parallel.graphs import GraphedDenoiser, _graphable, _signature
from torch.utils import _pytree as pytree


def _key(*args, **kwargs):
    return _signature(*pytree.tree_flatten((args, kwargs)))


def _leaves(*args, **kwargs):
    return pytree.tree_flatten((args, kwargs))[0]


def test_cpu_calls_pass_through_and_the_wrapper_is_the_denoiser():
    model = tiny_flux_transformer(num_layers=1, num_single_layers=1)
    inputs = flux_transformer_inputs(height=16, width=16)
    graphed = GraphedDenoiser(model)
    with torch.no_grad():
        torch.testing.assert_close(graphed(**inputs)[0], model(**inputs)[0], rtol=0, atol=0)
    assert graphed.config is model.config and graphed.dtype == model.dtype  # attributes reach the model
    assert not graphed._graphs  # nothing was captured off CUDA


def test_cfg_finds_the_latents_argument_through_a_graphed_denoiser():
    # cfg=2 splits the batch of the model's first argument; SD3 passes it by keyword, and on CUDA
    # the denoiser cfg wraps is the graphed one, whose forward takes *args (a KeyError: 'args' once).
    from ditmesh.models.tiny import tiny_sd3_transformer
    from ditmesh.parallel.cfg import _batch_arg

    model = tiny_sd3_transformer(num_layers=1)
    assert _batch_arg(GraphedDenoiser(model)) == _batch_arg(model) == "hidden_states"


def test_signature_names_shapes_and_values_and_refuses_what_a_graph_cannot_follow():
    x = torch.ones(2, 3)
    # One graph per signature: same shapes and values share it, anything else gets its own.
    assert _key(x, t=torch.zeros(1), return_dict=False) == _key(torch.zeros(2, 3), t=torch.ones(1), return_dict=False)
    assert _key(x, return_dict=False) != _key(torch.ones(2, 4), return_dict=False)
    assert _key(x, return_dict=False) != _key(x, return_dict=True)
    assert _key(x, return_dict=False) != _key(x.double(), return_dict=False)
    assert _key(x, kwargs={"scale": 1.0}) != _key(x, kwargs={"scale": 2.0})
    assert _key(x, scale=object()) is None  # an object's state is invisible to a replay
    with torch.no_grad():
        assert not _graphable(_leaves(x))  # CPU: no graph
    assert not _graphable(_leaves(torch.ones(2, requires_grad=True)))  # autograd records: no graph
