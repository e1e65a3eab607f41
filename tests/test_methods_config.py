"""Method configs and the one option translation (issue #14): weight decay and betas reach every method's
optimizer, each config validates and round-trips through JSON, and the CLI / TrainConfig / planner / HF spellings
all land in the same config field."""

from __future__ import annotations

import json

import pytest
import torch

from velora.methods.registry import build_optimizer, prepare_model
from velora.training.config import TrainConfig
from velora.training.models import build_config, build_model

DECAY, BETAS = 0.5, (0.8, 0.95)
# method, options; flora on an Adafactor base uses beta1 only (its second moment decays by beta2_decay)
METHODS = [
    ("full", {}, BETAS),
    ("lora", {"lora_rank": 4}, BETAS),
    ("dora", {"lora_rank": 4}, BETAS),
    ("qlora", {"lora_rank": 4}, BETAS),
    ("galore", {"galore_rank": 4, "update_proj_gap": 2}, BETAS),
    ("flora", {"flora_rank": 4, "optimizer": "adamw"}, BETAS),
    ("flora", {"flora_rank": 4, "optimizer": "adafactor"}, (0.8, 0.999)),
    ("gradnormlorp", {"gradnorm_rank": 4, "gradnorm_proj_rank": 2}, BETAS),
]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(build_config("llama-tiny", vocab_size=128))


def _two_steps(method: str, options: dict, weight_decay: float, betas) -> tuple[torch.optim.Optimizer, list]:
    """The optimizer built through TrainConfig (what `velora train` does) and the trainable weights after two
    steps on a fixed batch (two, so that Adam's betas matter: its first bias-corrected step does not see them)."""
    config = TrainConfig(method=method, lr=1e-2, weight_decay=weight_decay, options={**options, "betas": list(betas)})
    method_options = config.method_options()
    model = prepare_model(_model(), method, method_options)
    optimizer = build_optimizer(model, method, method_options)
    batch = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))  # (B, T)
    for _ in range(2):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer, [p.detach().clone() for p in model.parameters() if p.requires_grad]


def _group_betas(group: dict) -> tuple[float, float]:
    return tuple(group["betas"]) if "betas" in group else (group["beta1"], group["beta2"])


@pytest.mark.parametrize("method, options, betas", METHODS, ids=lambda v: v if isinstance(v, str) else None)
def test_weight_decay_and_betas_reach_every_optimizer_and_change_the_step(method, options, betas):
    optimizer, decayed = _two_steps(method, options, DECAY, betas)
    for group in optimizer.param_groups:
        assert group["weight_decay"] == DECAY and _group_betas(group) == betas, (method, group.keys())
    _, plain = _two_steps(method, options, 0.0, betas)
    assert any(not torch.equal(a, b) for a, b in zip(decayed, plain)), f"{method}: weight decay changed nothing"
    if betas != (0.8, 0.999):  # Adafactor-based FLoRA: beta1 alone differs, checked by the group above
        _, default_betas = _two_steps(method, options, DECAY, (0.9, 0.999))
        assert any(not torch.equal(a, b) for a, b in zip(decayed, default_betas)), f"{method}: betas changed nothing"


@pytest.mark.parametrize("method, options", [(m, o) for m, o, _ in METHODS if o.get("optimizer") != "adafactor"])
def test_eps_reaches_every_adam_style_optimizer(method, options):
    config = TrainConfig(method=method, options={**options, "eps": 1e-6})
    method_options = config.method_options()
    optimizer = build_optimizer(prepare_model(_model(), method, method_options), method, method_options)
    assert {group["eps"] for group in optimizer.param_groups} == {1e-6}


def test_flora_decay_and_betas_equal_torch_adamw_where_nothing_is_projected():
    """Flora (AdamW base) on vectors (never projected) is AdamW: decoupled decay and betas as torch's."""
    from velora.optim import Flora
    from velora.optim.flora import PAPER_ALG2

    torch.manual_seed(0)
    start = [torch.randn(7, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    ours = [p.clone().requires_grad_(True) for p in start]
    reference = [p.clone().requires_grad_(True) for p in start]
    flora = Flora(ours, lr=1e-2, rank=2, base="adamw", beta1=BETAS[0], beta2=BETAS[1], weight_decay=0.1,
                  **PAPER_ALG2)  # Adam's first moment: the EMA of the gradient
    adamw = torch.optim.AdamW(reference, lr=1e-2, betas=BETAS, weight_decay=0.1, foreach=False)
    for step in range(3):
        grads = [torch.randn_like(p) for p in start]
        for params in (ours, reference):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        flora.step()
        adamw.step()
        for a, b in zip(ours, reference):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"step {step}")


def test_cli_weight_decay_and_betas_change_a_flora_and_a_gradnormlorp_run(tmp_path, text_file):
    from safetensors.torch import load_file

    from velora.cli import main

    def final_weights(method: str, name: str, *flags: str) -> dict[str, torch.Tensor]:
        out = tmp_path / f"{method}-{name}"
        assert main(["train", "--method", method, "--data", str(text_file), "--tokenizer", "byte", "--steps", "2",
                     "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1", "--warmup-steps", "0",
                     "--flora-rank", "4", "--gradnorm-rank", "4", "--gradnorm-proj-rank", "2", "--optimizer",
                     "adamw", "--no-progress", "--no-memory", "--out", str(out), *flags]) == 0
        return load_file(str(next(out.rglob("model.safetensors"))))

    for method in ("flora", "gradnormlorp"):
        plain = final_weights(method, "plain")
        for name, flags in (("decay", ("--weight-decay", "0.5")), ("betas", ("--betas", "0.5", "0.9"))):
            changed = final_weights(method, name, *flags)
            assert any(not torch.equal(plain[k], changed[k]) for k in plain), f"{method} {flags} changed nothing"


# ---- the configs and the translation -------------------------------------------------------------------------


def test_every_option_key_round_trips_through_trainconfig_json_and_lands_in_its_config():
    from velora.methods.options import OPTION_KEYS, MethodOptions

    changed = {"optimizer": "adafactor", "lora_rank": 3, "lora_unfreeze": ["norm"], "qlora_compute_dtype": "bfloat16",
               "galore_rank": 5, "update_proj_gap": 7, "flora_rank": 6, "flora_momentum": "update",
               "flora_exact_current": True, "flora_orthogonal": False, "gradnorm_proj_rank": 3}
    config = TrainConfig(method="flora", options=changed)
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    options = again.method_options()
    assert (options.optim.name, options.lora.rank, options.lora.unfreeze) == ("adafactor", 3, ("norm",))
    assert (options.galore.rank, options.galore.update_proj_gap, options.flora.rank) == (5, 7, 6)
    assert (options.flora.momentum, options.flora.exact_current, options.flora.orthogonal) == ("update", True, False)
    assert options.gradnorm_lorp.proj_rank == 3 and options.lora.compute_dtype == "bfloat16"
    flat = options.to_flat()
    assert set(OPTION_KEYS) <= set(flat)
    assert MethodOptions.from_flat(flat) == options  # the flat spelling is lossless


@pytest.mark.parametrize("section", ["optim", "lora", "galore", "flora", "gradnorm_lorp"])
def test_each_config_round_trips_through_json_and_rejects_unknown_keys(section):
    from velora.methods.options import SECTIONS

    cls = SECTIONS[section]
    config = cls()
    assert cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"unknown .* keys \['bogus'\]; known keys are") as info:
        cls.from_dict({**config.to_dict(), "bogus": 1})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("options, message", [
    ({"lora_rank": 0}, "lora_rank=0 must be an integer >= 1"),
    ({"flora_kappa": 2.5}, "flora_kappa=2.5 must be an integer >= 1"),
    ({"flora_project": "middle"}, "project='middle' is not a projection side"),
    ({"galore_scale": -1.0}, "galore_scale=-1.0 must be a finite number > 0"),
    ({"betas": [0.9, 1.5]}, r"betas=\[0.9, 1.5\] must be two numbers in \[0, 1\)"),
    ({"flora_exact_current": "yes"}, "flora_exact_current='yes' must be True or False"),
    ({"lora_rnak": 4}, r"unknown method option\(s\) \['lora_rnak'\]; known: \[.*'lora_rank'"),
    ({"seed": 3}, r"unknown method option\(s\) \['seed'\].*TrainConfig fields"),
])
def test_bad_options_are_one_line_errors_when_the_config_is_made(options, message):
    with pytest.raises(ValueError, match=message) as info:
        TrainConfig(method="full", options=options)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method, options, message", [
    ("full", {"optimizer": "adafactor", "betas": [0.8, 0.99]}, r"betas=\(0.8, 0.99\) / eps=None do not apply to "
     "optimizer='adafactor'"),
    ("full", {"optimizer": "adafactor", "eps": 1e-6}, "eps=1e-06 do not apply to optimizer='adafactor'"),
    ("flora", {"optimizer": "adafactor", "betas": [0.8, 0.99]}, r"betas\[1\]=0.99 / eps=None do not apply to "
     "FLoRA's Adafactor base"),
])
def test_adafactor_rejects_the_betas_and_eps_it_would_ignore(method, options, message):
    method_options = TrainConfig(method=method, options=options).method_options()
    with pytest.raises(ValueError, match=message) as info:
        build_optimizer(_model(), method, method_options)
    assert "\n" not in str(info.value)


def test_cli_flags_are_generated_from_the_configs_and_keep_the_old_names():
    import argparse

    from velora.cli.train import add_arguments
    from velora.methods.options import OPTION_KEYS

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {flag for action in parser._actions for flag in action.option_strings}
    old = {"--optimizer", "--lora-rank", "--lora-alpha", "--lora-dropout", "--galore-rank", "--update-proj-gap",
           "--galore-scale", "--flora-rank", "--flora-kappa", "--flora-project", "--flora-projection",
           "--gradnorm-rank", "--gradnorm-proj-rank", "--gradnorm-update-proj-gap", "--flora-accumulation"}
    new = {"--betas", "--eps", "--flora-momentum", "--flora-exact-current", "--flora-momentum-orthogonal",
           "--gradnorm-alpha", "--gradnorm-scale", "--qlora-compute-dtype"}
    assert old | new <= flags
    assert {spec.flag for spec in OPTION_KEYS.values() if spec.flag} <= flags
    args = parser.parse_args(["--flora-momentum", "update", "--flora-exact-current", "--betas", "0.8", "0.9",
                              "--flora-projection", "gaussian", "--gradnorm-alpha", "4"])
    from velora.cli.train import config_from_args

    args.tokenizer = "byte"
    options = config_from_args(args).method_options()
    assert (options.flora.momentum, options.flora.exact_current, options.flora.orthogonal) == ("update", True, False)
    assert options.optim.betas == (0.8, 0.9) and options.gradnorm_lorp.alpha == 4.0


def test_planner_and_hf_take_the_same_keys():
    from velora.memory.planner import _method_options
    from velora.methods.options import MethodOptions

    planned = _method_options("adamw", {"flora_rank": 4, "betas": (0.8, 0.9), "velora_sub_token_size": 16})
    assert (planned.flora.rank, planned.optim.betas, planned.velora.sub_token_size) == (4, (0.8, 0.9), 16)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['flora_rnak'\]; plan\(\) takes \[.*'flora_rank'"):
        _method_options("adamw", {"flora_rnak": 4})
    transformers = pytest.importorskip("transformers")
    from velora.integrations.hf import method_options_from_args

    args = transformers.TrainingArguments(output_dir="unused", learning_rate=2e-3, weight_decay=0.3,
                                          adam_beta1=0.7, adam_beta2=0.9, report_to=[])
    options = method_options_from_args(args, {"flora_rank": 4})
    assert (options.optim.lr, options.optim.weight_decay, options.optim.betas) == (2e-3, 0.3, (0.7, 0.9))
    assert options.flora.rank == 4
    assert method_options_from_args(args, MethodOptions.from_flat({"flora_rank": 5})).optim.betas == (0.7, 0.9)
    with pytest.raises(ValueError, match=r"unknown method option\(s\) \['flora_rnak'\]"):
        method_options_from_args(args, {"flora_rnak": 4})


def test_flora_default_rank_comes_from_the_projectable_matrices_only():
    """A quarter of the smallest attention/MLP side, never the embeddings': the optimizer and the compressed
    accumulator agree."""
    from velora.methods.flora.method import compressed_accumulator
    from velora.optim.projections import projectable_parameters

    model = build_model(build_config("llama-tiny", vocab_size=16))  # embeddings (16, 64): the smallest side
    options = TrainConfig(method="flora", options={"optimizer": "adamw"}).method_options()
    expected = max(1, min(min(p.shape) for p in projectable_parameters(model)) // 4)
    optimizer = build_optimizer(model, "flora", options)
    assert expected == 16 and {g["rank"] for g in optimizer.param_groups} == {expected}
    assert compressed_accumulator(model, options, 2).rank == expected


def test_compare_sizes_each_method_through_the_registry():
    from velora.experiments.compare import method_overrides

    assert method_overrides("galore+velora", 8, 32, 50)["options"] == {"galore_rank": 8, "update_proj_gap": 50,
                                                                        "galore_scale": 0.25}
    # FLoRA runs as the paper does (issue #16): Adafactor base, kappa 1000 whatever the GaLore refresh gap
    assert method_overrides("flora", 8, 32, 50)["options"] == {"flora_rank": 8, "flora_kappa": 1000,
                                                               "optimizer": "adafactor"}
    assert method_overrides("velora", 8, 32, 50)["options"] == {}
    for method in ("full", "lora", "dora", "galore", "flora", "gradnormlorp"):
        TrainConfig(method=method, **method_overrides(method, 8, 32, 50))  # every override is a valid option


def test_compare_flora_row_is_the_papers_setting_and_says_so():
    from velora.experiments.compare import TUNED_LR, describe, method_overrides, table_label
    from velora.experiments.compare_report import table_rows

    config = TrainConfig(method="flora", lr=TUNED_LR["flora"], **method_overrides("flora", 8, 32, 50))
    options = config.method_options()
    optimizer = build_optimizer(prepare_model(_model(), "flora", options), "flora", options)
    groups = [g for g in optimizer.param_groups if g["compress"]]
    assert {(g["base"], g["kappa"], g["momentum"], g["exact_current"], g["orthogonal"], g["eps1"]) for g in groups} \
        == {("adafactor", 1000, "update", True, True, 1e-15)} and TUNED_LR["flora"] == 3e-2
    assert "kappa=1000, Adafactor base" in describe("flora", 8, 32, 50)
    assert (table_label("flora"), table_label("velora+flora"), table_label("full")) == \
        ("flora (Adafactor, κ=1000)", "velora+flora (Adafactor, κ=1000)", "full")
    row = {"method": "flora", "label": table_label("flora"), "lr": 3e-2, "val_ppl": 50.0,
           "val_ppl_vs_full_pct": 1.0, "activation_bytes": 0, "peak_bytes": 0, "peak_breakdown": {},
           "step_time_ratio": None}
    assert table_rows({"rows": [row]})[0][0] == "flora (Adafactor, κ=1000)"


# ---- core's layer hook: a method's layer type is wrapped without core knowing it ------------------------------


class _ScaledLinear(torch.nn.Module):
    """A layer whose weight is computed (s * W0, s trainable): the shape of a method's reparameterised linear."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.in_features = d_in
        self.weight = torch.nn.Parameter(torch.randn(d_out, d_in, dtype=torch.float64), requires_grad=False)
        self.bias = None
        self.scale = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.scale * self.weight)  # (..., d_out)


class _ScaledLayout:
    def _velora_weight(self):
        return self.scale * self.weight  # (O, D)

    def _velora_in_features(self):
        return self.in_features

    def _velora_active(self, x):
        return self.training and torch.is_grad_enabled() and self.scale.requires_grad


def test_a_registered_layer_type_is_wrapped_and_its_gradient_flows_through_the_layout():
    import velora
    from velora.core.layers import register_layer_type
    from velora.core.subtoken import orthonormalise

    wrapper = register_layer_type(_ScaledLinear, _ScaledLayout, "VeLoRAScaledLinear")
    torch.manual_seed(0)
    plain = torch.nn.Sequential(_ScaledLinear(16, 8))
    model = torch.nn.Sequential(_ScaledLinear(16, 8))
    model.load_state_dict(plain.state_dict())
    v = orthonormalise(torch.randn(8, 1, dtype=torch.float64))[:, 0]  # (M,)
    velora.apply_velora(model, velora.VeLoRAConfig(sub_token_size=8, init=v, target_modules="0"))
    assert type(model[0]) is wrapper
    x = torch.randn(5, 2, 1, dtype=torch.float64) * v  # (5, D/M, M): every sub-token on span(v)
    x = x.reshape(5, 16)  # (T, D)
    out, ref = model(x), plain(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    torch.testing.assert_close(model[0].scale.grad, plain[0].scale.grad, rtol=1e-10, atol=1e-10)


def test_a_velora_wrapped_gradnorm_lorp_model_pickles(tmp_path):
    import velora
    from velora.methods.gradnorm_lorp.model import GradNormLoRPConfig, apply_gradnorm_lorp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    apply_gradnorm_lorp(model, GradNormLoRPConfig(rank=4, target_modules=["0"]))
    velora.apply_velora(model, velora.VeLoRAConfig(sub_token_size=8, target_modules="0"))
    torch.save(model, tmp_path / "model.pt")
    again = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(again[0]) is type(model[0]) and type(model[0]).__name__ == "VeLoRAGradNormLoRPLinear"
    x = torch.randn(3, 32)
    assert torch.equal(again.eval()(x), model.eval()(x))


def test_velora_plan_takes_the_generated_flags_and_checks_them_in_one_line(capsys):
    import argparse

    from velora.cli import main
    from velora.cli.plan import _options, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "llama-tiny", "--flora-rank", "4", "--flora-momentum", "update",
                              "--gradnorm-proj-rank", "2", "--betas", "0.8", "0.9"])
    assert _options(args) == {"flora_rank": 4, "flora_momentum": "update", "gradnorm_proj_rank": 2,
                              "betas": [0.8, 0.9]}
    assert main(["plan", "--model", "llama-tiny", "--method", "flora", "--flora-rank", "0"]) == 2
    err = capsys.readouterr().err
    assert "flora_rank=0 must be an integer >= 1" in err and len(err.strip().splitlines()) == 1


def test_flora_eps1_reaches_the_adafactor_base_and_changes_the_step():
    """``flora_eps1`` (``--flora-eps1``): the floor of Flora's Adafactor base (default 1e-15, the FLoRA authors' v_hat
    floor 1e-30), checked against torch's rule (float32 eps) on gradients below float32 eps, where that rule clamps
    the row mean."""
    from velora.methods.options import MethodOptions

    def step(options: dict) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = build_model(build_config("llama-tiny", vocab_size=64))
        optimizer = build_optimizer(model, "flora", MethodOptions.from_flat({"lr": 1e-2, "optimizer": "adafactor",
                                                                             "flora_rank": 4, **options}))
        for param in model.parameters():
            param.grad = torch.full_like(param, 1e-5)  # mean(G^2) = 1e-10 < float32 eps
        optimizer.step()
        return [p.detach().clone() for p in model.parameters()], optimizer

    default, optimizer = step({})
    assert {group["eps1"] for group in optimizer.param_groups} == {1e-15}  # Flora's default since issue #16
    floored, optimizer = step({"flora_eps1": 1e-15})
    assert all(torch.equal(a, b) for a, b in zip(default, floored))
    torch_rule, optimizer = step({"flora_eps1": torch.finfo(torch.float32).eps})
    assert {group["eps1"] for group in optimizer.param_groups} == {torch.finfo(torch.float32).eps}
    assert any(not torch.equal(a, b) for a, b in zip(torch_rule, floored))
    with pytest.raises(ValueError, match="flora_eps1=1e-15 applies to FLoRA's Adafactor base only"):
        step({"flora_eps1": 1e-15, "optimizer": "adamw"})
    with pytest.raises(ValueError, match="flora_eps1=-1"):
        MethodOptions.from_flat({"flora_eps1": -1})


def test_a_method_registered_from_its_own_folder_gets_its_section_keys_and_flags():
    """Adding a method touches its folder only (plus its import line): registering a BaseMethod with a config makes
    ``options.<section>``, the flat keys, the CLI flags and the optimizer path work; a clashing section is refused."""
    import argparse
    from dataclasses import dataclass

    from velora.methods import options as options_module
    from velora.methods import registry
    from velora.methods.common import ConfigBase, check_number, option, trainable_parameters

    @dataclass
    class ToyConfig(ConfigBase):
        section = "toy"
        prefix = "toy"
        momentum: float = option(0.5, "toy momentum")

        def __post_init__(self) -> None:
            check_number("toy_momentum", self.momentum, positive=False)

    def toy_optimizer(model, options):
        return torch.optim.SGD(trainable_parameters(model), lr=options.optim.lr, momentum=options.toy.momentum)

    sections, bases = dict(options_module._SECTIONS), dict(registry._BASES)  # restored below
    try:
        registry.register(registry.BaseMethod("toy", "SGD with momentum", registry.keep_model, toy_optimizer,
                                              config=ToyConfig))
        parser = argparse.ArgumentParser()
        options_module.add_option_flags(parser)
        flat = options_module.options_from_flags(parser.parse_args(["--toy-momentum", "0.25"]))
        options = options_module.MethodOptions.from_flat({**flat, "lr": 0.1})
        assert flat == {"toy_momentum": 0.25} and options.toy == ToyConfig(0.25)
        assert options.to_flat()["toy_momentum"] == 0.25 and options_module.MethodOptions().toy == ToyConfig()
        model = torch.nn.Linear(3, 2)
        optimizer = build_optimizer(model, "toy", options)
        assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.25
        with pytest.raises(ValueError, match="toy_momentum=-1"):
            options_module.MethodOptions.from_flat({"toy_momentum": -1.0})

        @dataclass
        class Clash(ConfigBase):
            section = "flora"
            prefix = "clash"

        with pytest.raises(ValueError, match="Clash.section='flora' is taken"):
            registry.register(registry.BaseMethod("clash", "", registry.keep_model, toy_optimizer, config=Clash))
    finally:
        for registered, saved in ((options_module._SECTIONS, sections), (registry._BASES, bases)):
            registered.clear()
            registered.update(saved)
        options_module.option_keys.cache_clear()  # the keys of the restored sections
