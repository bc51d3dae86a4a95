"""The bundled model shows a personal concept: issue 12's acceptance targets, judged by the attribute classifier.

A shipped concept, rendered over 32 seeds, shows its shape, colours and pattern where its super-category word
alone does not, and still follows background edits at some truncation. `red-hexagon` and `yellow-heart` (new in
their geometry) meet the targets and run with the slow tests; the concepts with new colours do not yet (toyworld/README.md,
"Personalization") and are marked `targets` (`python -m pytest -m targets`)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow
NOT_YET = pytest.mark.targets  # concepts whose colours the bundled model does not reach yet


@pytest.mark.parametrize("name", ["red-hexagon", "yellow-heart", *(pytest.param(n, marks=NOT_YET) for n in (
    "dotted-crescent", "checkered-heart", "striped-hexagon", "checkered-circle", "two-tone-star"))])
def test_shipped_concept_meets_the_fidelity_and_editability_targets(name):
    from neti import Concept, Generator, Sampling, load_images, load_pipeline
    from neti.evaluate import BUNDLED_CLIP, ClipJudge
    from toyworld.classifier import load_classifier
    from toyworld.examples import EXAMPLES
    from toyworld.personalization import REPO, TARGETS, measure_concept

    torch.set_num_threads(2)
    example = next(e for e in EXAMPLES if e.name == name)
    generator = Generator(load_pipeline(None, "cpu"))
    concept = Concept.load(REPO / "assets" / "concepts" / f"{name}.safetensors")
    photos = list(load_images(REPO / "assets" / "examples" / name).pil_images)
    report, _ = measure_concept(generator, concept, example, photos, load_classifier(), ClipJudge.load(BUNDLED_CLIP),
                                list(range(32)), list(range(6)), Sampling(steps=25))
    assert report["fidelity"]["shape"] >= TARGETS["shape"], report
    assert report["fidelity"]["colours"] >= TARGETS["colours"], report
    assert report["fidelity"]["pattern"] >= TARGETS["pattern"], report
    assert report["super_category_alone"]["all"] <= TARGETS["word_alone"], report
    best = report["editability"][report["best_k"]]
    assert best["background"] >= TARGETS["edit_background"] and best["shape"] >= TARGETS["edit_shape"], report
