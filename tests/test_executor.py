"""The executor: the one place that mixes guidance and decodes latents; a step changes its samples only when
it succeeds. (Its images are checked against a plain diffusers loop in test_generation and test_stepbatch.)"""

import ast
from pathlib import Path

import pytest
import torch

from catversion.generation import GenerationRequest, ImageGenerator
from catversion.models import load_base_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def generator():
    return ImageGenerator(load_base_model("tiny"))


def guidance_mixes_and_decodes(path):
    """(line, what) of every ``uncond + s * (cond - uncond)`` expression (``a + s * (b - a)`` whose ``a``
    names an unconditional prediction: other linear interpolations are not guidance) and every
    ``<...>vae.decode(...)`` call in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and isinstance(node.right, ast.BinOp)
                and isinstance(node.right.op, ast.Mult)):
            for factor in (node.right.left, node.right.right):
                if (isinstance(factor, ast.BinOp) and isinstance(factor.op, ast.Sub)
                        and ast.dump(factor.right) == ast.dump(node.left) and "uncond" in ast.unparse(node.left)):
                    found.append((node.lineno, "guidance mix"))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "decode":
            owner = node.func.value
            if (isinstance(owner, ast.Name) and owner.id == "vae") or (isinstance(owner, ast.Attribute) and owner.attr == "vae"):
                found.append((node.lineno, "VAE decode"))
    return found


def test_one_place_mixes_guidance_and_one_decodes_latents():
    places = {}
    for package in ("catversion", "pipelines", "serve"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, what in guidance_mixes_and_decodes(path):
                places.setdefault(what, []).append(f"{path.relative_to(ROOT)}:{line}")
    assert len(places.get("guidance mix", [])) == 1 and places["guidance mix"][0].startswith("catversion/executor.py:")
    assert len(places.get("VAE decode", [])) == 1 and places["VAE decode"][0].startswith("catversion/executor.py:")
    # the detector itself sees the reference loop's textbook mix and decode
    assert {what for _, what in guidance_mixes_and_decodes(ROOT / "tests" / "reference_sampling.py")} == {
        "guidance mix", "VAE decode"}


def samples(generator, steps=3):
    requests = [GenerationRequest("a teapot", seed=1), GenerationRequest("a dog", seed=2)]
    cond, uncond = generator.encode(requests)
    noise = generator.initial_latents([r.seed for r in requests], 32)
    return [generator.executor.sample(noise[i : i + 1], cond[i : i + 1], uncond[i : i + 1], guidance, steps)
            for i, guidance in enumerate((7.5, 1.0))]


def test_a_failed_step_changes_no_sample_and_a_finished_one_takes_no_further_step(generator, monkeypatch):
    executor = generator.executor
    batch = samples(generator)
    executor.step(batch)
    before = [(s.index, s.latents.clone()) for s in batch]

    def broken(latents, timesteps, embeddings):
        raise RuntimeError("device fault")

    monkeypatch.setattr(executor, "runner", broken)
    with pytest.raises(RuntimeError, match="device fault"):
        executor.step(batch)
    monkeypatch.undo()
    for sample, (index, latents) in zip(batch, before):
        assert sample.index == index and torch.equal(sample.latents, latents)

    executor.step(batch)
    executor.step(batch)
    assert all(sample.finished for sample in batch)
    with pytest.raises(ValueError, match="finished sample"):
        executor.step(batch)
