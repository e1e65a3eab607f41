"""load_state_dict refuses another optimizer's (or the accumulator's) state in one line that says what differs,
instead of a misleading message, a KeyError at the first step, or silently running as the saved kind."""

from __future__ import annotations

import pytest
import torch

from velora.optim import CompressedGradAccumulator, Flora, GaLoreAdamW

torch.set_num_threads(1)


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(6, 8)), torch.nn.Parameter(torch.randn(8))]


def _galore(params):
    return GaLoreAdamW([dict(params=params[:1], rank=2), dict(params=params[1:])], lr=1e-2)


def _saved(make) -> dict:
    """The state_dict of an optimizer after one step."""
    params = _params()
    optimizer = make(params)
    (params[0].sum() ** 2 + params[1].square().sum()).backward()
    optimizer.step()
    return optimizer.state_dict()


def _refusal(load) -> str:
    with pytest.raises(ValueError) as info:
        load()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_adamw_state_into_flora_names_adamw():
    saved = _saved(lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    message = _refusal(lambda: Flora(_params(), lr=1e-2, rank=2).load_state_dict(saved))
    assert "torch.optim.Adam/AdamW" in message and "not Flora" in message and "project" not in message


def test_flora_state_into_galore_is_refused_before_any_step():
    saved = _saved(lambda ps: Flora(ps, lr=1e-2, rank=2))
    message = _refusal(lambda: _galore(_params()).load_state_dict(saved))
    assert "saved by Flora, not GaLoreAdamW" in message and "proj_type" in message
    galore = _saved(_galore)
    assert "saved by GaLoreAdamW" in _refusal(lambda: Flora(_params(), lr=1e-2, rank=2).load_state_dict(galore))


@pytest.mark.parametrize("saved_kwargs, here_kwargs, fragment", [
    (dict(base="adafactor"), dict(base="adamw"), "base='adafactor' saved vs 'adamw' here"),
    (dict(rank=2), dict(rank=3), "rank=2 saved vs 3 here"),
    (dict(eight_bit=True), dict(eight_bit=False), "eight_bit=True saved vs False here"),
    (dict(beta1=0.0), dict(beta1=0.9), "momentum=False saved vs True here"),
])
def test_flora_of_another_layout_is_refused_not_run_as_the_saved_kind(saved_kwargs, here_kwargs, fragment):
    saved = _saved(lambda ps: Flora(ps, lr=1e-2, **{"rank": 2, **saved_kwargs}))
    flora = Flora(_params(), lr=1e-2, **{"rank": 2, **here_kwargs})
    assert fragment in _refusal(lambda: flora.load_state_dict(saved))
    assert not flora.state  # nothing was loaded
    # options that do not change what the state holds are restored from the saved state, as torch.optim does
    same = Flora(_params(), lr=5e-3, **{"rank": 2, **saved_kwargs})
    same.load_state_dict(saved)
    assert same.param_groups[0]["lr"] == 1e-2


def test_galore_of_another_rank_is_refused():
    saved = _saved(_galore)
    other = GaLoreAdamW([dict(params=_params()[:1], rank=3), dict(params=_params()[1:])], lr=1e-2)
    assert "rank=2 saved vs 3 here" in _refusal(lambda: other.load_state_dict(saved))


def test_accumulator_refuses_optimizer_states_and_other_reductions():
    acc = CompressedGradAccumulator(_params(), rank=2, accumulation_steps=2)
    assert "optimizer state_dict" in _refusal(lambda: acc.load_state_dict(_saved(lambda ps: Flora(ps, lr=1e-2,
                                                                                                 rank=2))))
    assert "not an accumulator state" in _refusal(lambda: acc.load_state_dict({"rank": 2}))
    assert "'state' and 'param_groups'" in _refusal(lambda: Flora(_params(), lr=1e-2, rank=2).load_state_dict(
        acc.state_dict()))
    mean = CompressedGradAccumulator(_params(), rank=2, accumulation_steps=2, reduction="mean")
    assert "reduction='sum'" in _refusal(lambda: mean.load_state_dict(acc.state_dict()))
