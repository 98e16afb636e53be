"""Cached PiSSA init: a hit reproduces the computed init exactly, without an SVD; any changed input misses."""

from __future__ import annotations

import copy

import pytest
import torch

import balora.init_cache as init_cache
from balora import BALoRAConfig, get_balora_model
from balora.experiment import load_experiment

from cli_fixtures import REPO_ROOT
from conftest import tiny_gpt2, tiny_llama


def _state(model):
    """Every adapter factor and base weight of the adapted layers, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n or "base_layer" in n}


def _assert_same(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _entries(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _no_svd(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a cache hit must not run the SVD")

    monkeypatch.setattr(init_cache, "pissa_factors", fail)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("niter", [None, 2])
def test_hit_equals_the_computed_init_without_an_svd(factory, niter, tmp_path, monkeypatch):
    base = factory()
    settings = dict(r=4, init_niter=niter, seed=3)
    uncached = _state(get_balora_model(copy.deepcopy(base), BALoRAConfig(**settings)))
    first = get_balora_model(copy.deepcopy(base), BALoRAConfig(**settings, init_cache=str(tmp_path)))
    _assert_same(_state(first), uncached)
    assert len(_entries(tmp_path)) == 1, "one entry, no temporary folder left behind"
    entry = tmp_path / _entries(tmp_path)[0]
    assert sorted(p.name for p in entry.iterdir()) == [init_cache.ENTRY_FILE, init_cache.WEIGHTS_FILE]

    _no_svd(monkeypatch)
    second = get_balora_model(copy.deepcopy(base), BALoRAConfig(**settings, init_cache=str(tmp_path)))
    _assert_same(_state(second), uncached)
    ids = torch.randint(3, 101, (2, 7))
    second.eval()
    with torch.no_grad():
        torch.testing.assert_close(second(input_ids=ids).logits, base.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "change",
    [
        {"r": 2}, {"alpha": 8.0}, {"init_niter": 2}, {"seed": 1}, {"target_modules": ["q_proj", "v_proj"]},
        {"weights": "one element"}, {"weights": "bfloat16"},
    ],
    ids=lambda c: next(iter(c.items()))[1] if "weights" in c else next(iter(c)),
)
def test_a_changed_input_never_hits_a_stale_entry(change, tmp_path):
    base = tiny_llama()
    settings = dict(r=4, init_niter=None, seed=0, target_modules="all-linear")
    get_balora_model(copy.deepcopy(base), BALoRAConfig(**settings, init_cache=str(tmp_path)))
    assert len(_entries(tmp_path)) == 1

    changed = copy.deepcopy(base)
    if change.get("weights") == "one element":
        with torch.no_grad():
            changed.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    elif change.get("weights") == "bfloat16":
        changed = changed.to(torch.bfloat16)
    else:
        settings.update(change)
    expected = _state(get_balora_model(copy.deepcopy(changed), BALoRAConfig(**settings)))
    got = _state(get_balora_model(copy.deepcopy(changed), BALoRAConfig(**settings, init_cache=str(tmp_path))))
    assert len(_entries(tmp_path)) == 2, "a changed input must make a new entry"
    _assert_same(got, expected)


def test_oversample_is_part_of_the_key_for_randomized_svd(tmp_path):
    base = tiny_llama()
    for oversample in (8, 2):
        config = BALoRAConfig(r=4, init_niter=1, init_oversample=oversample, init_cache=str(tmp_path))
        get_balora_model(copy.deepcopy(base), config)
    assert len(_entries(tmp_path)) == 2


def test_auto_uses_the_balora_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("BALORA_CACHE", str(tmp_path))
    get_balora_model(tiny_llama(), BALoRAConfig(r=2, init_cache="auto"))
    assert len(_entries(tmp_path / "pissa_init")) == 1


def test_a_concurrent_writer_that_stored_first_is_kept(tmp_path, monkeypatch):
    base = tiny_llama()
    config = BALoRAConfig(r=2, init_cache=str(tmp_path))
    get_balora_model(copy.deepcopy(base), config)
    entry = tmp_path / _entries(tmp_path)[0]
    before = (entry / init_cache.WEIGHTS_FILE).read_bytes()
    # Another process finished the same entry between our lookup and our rename: ours is dropped, theirs stays.
    real_is_file = init_cache.Path.is_file
    calls = {"n": 0}

    def first_lookup_misses(self):
        if self == entry / init_cache.WEIGHTS_FILE and calls["n"] == 0:
            calls["n"] += 1
            return False
        return real_is_file(self)

    monkeypatch.setattr(init_cache.Path, "is_file", first_lookup_misses)
    get_balora_model(copy.deepcopy(base), config)
    assert calls["n"] == 1
    assert _entries(tmp_path) == [entry.name]
    assert (entry / init_cache.WEIGHTS_FILE).read_bytes() == before


def test_init_cache_setting_is_checked_and_reaches_the_cli_config(tmp_path):
    with pytest.raises(ValueError, match="init_cache must be null, 'auto' or a folder"):
        BALoRAConfig(init_cache="  ")
    experiment, _ = load_experiment(REPO_ROOT / "configs/nlu/sst2-minilm.yaml", ["--balora.init_cache", str(tmp_path)])
    assert experiment.balora.init_cache == str(tmp_path)
