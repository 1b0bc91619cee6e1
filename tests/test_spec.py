"""Typed trainer specs (nnunet_diffusion/spec.py) and the one registry of heads (nnunet_diffusion/registry.py)."""
import ast
import dataclasses
from pathlib import Path

import pytest

from nnunet_diffusion import registry, spec
from nnunet_diffusion.errors import NNDiffConfigError
from nnunet_diffusion.heads.nndm import NNDMSpec

PACKAGE = Path(__file__).resolve().parents[1] / "nnunet_diffusion"


@pytest.fixture
def toml(monkeypatch, tmp_path):
    """Write a trainer config for head 'nndm' to a temporary file and parse it as NNDMSpec."""
    base = (Path(__file__).resolve().parents[1] / "trainer_configs" / "nndm.toml").read_text()

    def parse(extra: str, variant=None):
        f = tmp_path / "nndm.toml"
        f.write_text(base + "\n" + extra)
        monkeypatch.setattr(spec, "config_file", lambda head: f)
        spec.load_toml.cache_clear()
        try:
            return spec.parse(NNDMSpec, "nndm", variant)
        finally:
            spec.load_toml.cache_clear()
    return parse


def test_every_variant_of_every_head_parses_into_its_typed_spec():
    for h in registry.HEADS:
        for v in [None, *spec.variant_names(h.name)]:
            s = registry.settings(h.name, v)
            assert isinstance(s, h.spec) and dataclasses.is_dataclass(s)
            assert s.optimizer_steps == s.total_epochs * s.num_iterations_per_epoch > 0
            with pytest.raises(dataclasses.FrozenInstanceError):
                s.num_iterations_per_epoch = 1


def test_values_have_their_declared_types():
    s = registry.settings("nndm", "table")
    assert isinstance(s.refiner_channels, tuple) and all(isinstance(c, int) for c in s.refiner_channels)
    assert isinstance(s.beta_start, float) and isinstance(s.sampling_steps, int)
    assert isinstance(s.as_dict()["refiner_channels"], list)  # the checkpoint's plain form


@pytest.mark.parametrize("extra,match", [
    ("[variants.x]\nsampling_steps = 'ten'", r"nndm\.toml \[variants\.x\]: sampling_steps must be an integer; got 'ten'"),
    ("[variants.x]\nsampling_steps = true", r"\[variants\.x\]: sampling_steps must be an integer; got True"),
    ("[variants.x]\nsampler = 'euler'", r"\[variants\.x\]: sampler must be one of ddpm, ddim; got 'euler'"),
    ("[variants.x]\nresidual_source = 'in_sample'", r"\[variants\.x\]: residual_source must be one of auto, backbone, dropout, oof"),
    ("[variants.x]\nrefiner_grad_clip = 0", r"\[variants\.x\]: refiner_grad_clip must be > 0; got 0"),
    ("[variants.x]\nsampling_steps = 1001", r"\[variants\.x\]: sampling_steps: must be in 1\.\.num_train_timesteps"),
    ("[variants.x]\nrefiner_channels = [8, 'a']", r"refiner_channels must be a list of integers"),
    ("[variants.x]\nresidual_source = 'dropout'\nresidual_dropout = 0.0",
     r"\[variants\.x\]: residual_dropout: residual_source = \"dropout\" needs 0 < residual_dropout < 1"),
    ("[variants.x]\nsampling_step = 4", r"nndm\.toml \[variants\.x\]: unknown key\(s\) \['sampling_step'\]"),
])
def test_a_bad_value_names_file_variant_and_key(toml, extra, match):
    with pytest.raises(spec.SpecError, match=match):
        toml(extra, "x")


def test_a_bad_variant_is_refused_even_when_another_is_asked_for(toml):
    """Every table of the file is checked for unknown keys whichever variant is parsed: a typo never waits."""
    with pytest.raises(NNDiffConfigError, match=r"\[variants\.x\]: unknown key"):
        toml("[variants.x]\nsampling_step = 4", None)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(spec.SpecError, match=r"unknown nndm variant 'tinny'.*tiny"):
        registry.settings("nndm", "tinny")


def test_registry_names_every_trainer_module_and_config():
    from nnunet_diffusion.trainers import TRAINERS
    for h in registry.HEADS:
        assert (PACKAGE / "trainers" / f"{h.module}.py").is_file()
        assert spec.config_file(h.name).is_file()
        assert h.spec.HEAD == h.name
        for v in spec.variant_names(h.name):
            cls = TRAINERS[h.trainer_name(v)]
            assert cls.head == h.name and cls.variant == v
            assert registry.for_trainer_name(cls.__name__) == (h, v)
    assert registry.for_trainer_name("nnUNetTrainerDA5") is None  # nnU-Net's own trainers are not ours


def _head_name_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """Comparisons and membership tests against a head's name: ``x == "nndm"``, ``"recoseg" in trainers``."""
    names = set(registry.names())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for part in [node.left, *node.comparators]:
                if isinstance(part, ast.Constant) and part.value in names:
                    out.append((node.lineno, part.value))
    return out


def test_no_head_specific_branch_outside_a_heads_own_modules():
    """Code that is not a head's own (its heads/, nets/, trainers/, inference/ modules) asks the registry for a
    capability instead of comparing a head's name."""
    own = {f"{d}/{h.name}" for h in registry.HEADS for d in ("heads", "nets", "trainers", "inference")}
    bad = []
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE).as_posix()
        if any(rel.startswith(o) for o in own) or rel == "registry.py":
            continue
        bad += [f"{rel}:{line} compares with {name!r}" for line, name in _head_name_literals(ast.parse(f.read_text()))]
    assert not bad, "\n".join(bad)


def test_the_benchmarks_ask_the_registry_too():
    """The generic benchmarks (speed, accuracy, held-out, the table) ask the registry for what differs between heads;
    a head's own benchmark script (benchmarks/<head>_*.py) may name it."""
    root = PACKAGE.parent / "benchmarks"
    own = tuple(f"{h.name}_" for h in registry.HEADS)
    bad = []
    for f in sorted(root.glob("*.py")):
        if f.name.startswith(own):
            continue
        bad += [f"benchmarks/{f.name}:{line} compares with {name!r}"
                for line, name in _head_name_literals(ast.parse(f.read_text()))]
    assert not bad, "\n".join(bad)


def test_the_branch_finder_sees_both_forms():
    tree = ast.parse('if head == "nndm":\n    pass\nif "recoseg" in trainers:\n    pass\n')
    assert [n for _, n in _head_name_literals(tree)] == ["nndm", "recoseg"]
