"""evaluate(): the numbers it reports equal ones computed independently from the model."""
import os
import sys

import numpy as np
import pytest
import torch

from occamnets.config import RunConfig
from occamnets.data import DeviceSplit
from occamnets.evaluate import cam_picture_data, evaluate, inference_backend, load_model
from occamnets.models import occam_resnet18, resnet18
from occamnets.train import Trainer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
from benchutils import force_exit_distribution  # noqa: E402


def synthetic_split(count=37, size=16, classes=5, masks=False):
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, classes, (count,), generator=generator)
    factors = torch.stack([labels, torch.randint(0, classes, (count,), generator=generator)], 1)
    packed = None
    if masks:
        pixels = torch.rand(count, size, size, generator=generator) < 0.3
        packed = torch.from_numpy(np.packbits(pixels.numpy(), axis=-1))
    return DeviceSplit(images, labels, factors, ["colour", "texture"], masks=packed,
                       aligned=factors == labels[:, None])


def test_occamnet_evaluation_matches_the_model():
    torch.manual_seed(0)
    model = occam_resnet18(5, width=4, stem="3x3", backend="reference").eval()
    split = synthetic_split()
    x = split.batch(torch.arange(len(split)))
    force_exit_distribution(model, x, (0.4, 0.3, 0.3))
    # Batches of 8: compaction per batch must still give the whole split's decisions.
    result = evaluate(model, split, "test", batch_size=8, time_full_depth=True)
    with torch.no_grad():
        early = model.early_exit(x)
        every = model(x)
    correct = early.logits.argmax(1) == split.labels
    assert result.images == 37 and result.accuracy == pytest.approx(correct.float().mean().item())
    assert result.exit_counts == early.exit_counts.tolist() and result.exit_counts[0] == 0
    assert result.first_inference_exit == 1
    assert sum(result.exit_share) == pytest.approx(1.0)
    for t in range(4):
        taken = early.exit_index == t
        want = correct[taken].float().mean().item() if taken.any() else None
        assert result.exit_accuracy_taken[t] == (pytest.approx(want) if want is not None else None)
        assert result.exit_accuracy_all_samples[t] == pytest.approx(
            (every.exits[t].logits.argmax(1) == split.labels).float().mean().item())
    aligned = split.factors[:, 1] == split.labels
    assert result.factors["texture"].aligned == pytest.approx(correct[aligned].float().mean().item())
    assert result.factors["texture"].conflicting == pytest.approx(
        correct[~aligned].float().mean().item())
    assert result.images_per_s > 0 and result.full_depth_images_per_s > 0
    assert "| E2 |" in result.to_markdown()


def test_baseline_evaluation_has_no_exits_and_empty_splits_are_refused():
    model = resnet18(5, width=4, stem="3x3")
    split = synthetic_split()
    result = evaluate(model, split, "val", per_factor=False, time_full_depth=True)
    with torch.no_grad():
        want = (model.eval()(split.batch(torch.arange(len(split)))).argmax(1) == split.labels)
    assert result.accuracy == pytest.approx(want.float().mean().item())
    assert result.exit_share is None and result.full_depth_images_per_s is None
    assert result.factors == {} and "| E1 |" not in result.to_markdown()
    assert [d.name for d in result.diagnostics] == ["output"]
    assert result.diagnostics[0].gate_calibration is None and result.diagnostics[0].cam is None
    empty = DeviceSplit(split.images[:0], split.labels[:0], split.factors[:0], ["a", "b"])
    with pytest.raises(ValueError, match="the val split is empty"):
        evaluate(model, empty, "val")


def test_cam_picture_data_and_load_model(tmp_path):
    splits = {name: synthetic_split() for name in ("train", "val", "test")}
    config = RunConfig(epochs=1, batch_size=8, width=4, device="cpu", backend="reference",
                       progress=False, out_dir=str(tmp_path))
    trainer = Trainer(config, splits)
    trainer.run()
    model, loaded = load_model(config.checkpoint_path)
    assert loaded == trainer.config and not model.training
    assert loaded.out_dir == str(tmp_path) and os.path.isabs(loaded.data_dir)
    for (name, a), b in zip(trainer.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    data = cam_picture_data(model, splits["test"], count=3)
    assert model.first_inference_exit == 1 and data.column_names == ["E1", "E2", "E3"]
    assert len(data.cams) == len(data.predictions) == 3
    assert data.cams[0].shape == (3, 5, 8, 8) and data.images.dtype == torch.uint8  # exit 1
    assert all(0 <= taken <= 2 for taken in data.exit_taken)   # a column index
    with pytest.raises(ValueError, match="not an occamnets checkpoint"):
        torch.save({"model": {}}, tmp_path / "bad.pt")
        load_model(str(tmp_path / "bad.pt"))
    # A checkpoint of the exits without conv biases (before 2026-11-27): a clear refusal.
    old = torch.load(config.checkpoint_path, weights_only=False)
    old["model"] = {k: v for k, v in old["model"].items()
                    if not (k.startswith("exits.") and ".features." in k and k.endswith("bias")
                            and v.dim() == 1 and "features.1" not in k)}
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="do not fit this version's OccamNet"):
        load_model(str(tmp_path / "old.pt"))


def test_a_run_trained_on_a_gpu_backend_is_evaluated_on_the_cpu(tmp_path):
    """A checkpoint keeps the backend it was trained with; where that one cannot run (the
    CUDA kernels on a CPU), load_model falls back to "auto", which computes the same."""
    splits = {name: synthetic_split() for name in ("train", "val", "test")}
    config = RunConfig(epochs=1, batch_size=8, width=4, device="cpu", backend="reference",
                       progress=False, out_dir=str(tmp_path))
    Trainer(config, splits).run()
    want, _ = load_model(config.checkpoint_path, device="cpu")
    checkpoint = torch.load(config.checkpoint_path, weights_only=False)
    checkpoint["config"]["backend"] = "cuda"
    torch.save(checkpoint, tmp_path / "cuda.pt")
    model, loaded = load_model(str(tmp_path / "cuda.pt"), device="cpu")
    assert loaded.backend == "cuda"     # the run's config is reported as it was
    images = splits["test"].batch(torch.arange(6))
    with torch.no_grad():
        got, expected = model(images).exits, want(images).exits
    for a, b in zip(got, expected):
        assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert inference_backend("cuda", torch.device("cpu")) == "auto"
    assert inference_backend("reference", torch.device("cpu")) == "reference"
    assert inference_backend("auto", torch.device("cpu")) == "auto"


def ece(confidence, outcome, bins=10):
    """Expected calibration error written out bin by bin (the textbook definition)."""
    confidence, outcome = confidence.double().numpy(), outcome.double().numpy()
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = (confidence >= low) & ((confidence < high) if b < bins - 1 else (confidence <= high))
        if inside.any():
            total += inside.sum() * abs(outcome[inside].mean() - confidence[inside].mean())
    return total / len(confidence)


def test_per_exit_diagnostics_match_direct_computation():
    torch.manual_seed(0)
    model = occam_resnet18(5, width=4, stem="3x3", backend="reference").eval()
    split = synthetic_split(masks=True)
    result = evaluate(model, split, "test", batch_size=8)
    with torch.no_grad():
        out = model(split.batch(torch.arange(len(split))), return_cams=True)
    from occamnets.data.loaders import unpack_masks
    pixels = unpack_masks(split.masks, 16).float()
    assert [d.name for d in result.diagnostics] == ["E0", "E1", "E2", "E3"]
    for t, d in enumerate(result.diagnostics):
        probabilities = torch.softmax(out.exits[t].logits, 1)
        correct = probabilities.argmax(1) == split.labels
        assert d.class_calibration.ece == pytest.approx(ece(probabilities.max(1).values, correct))
        assert d.gate_calibration.ece == pytest.approx(ece(out.exits[t].gate, correct))
        assert sum(d.class_calibration.counts) == len(split) and d.nonfinite_logits == 0
        check_cam_mass(d.cam, out.exits[t].cam, split, pixels)
    assert "| E3 |" in result.to_markdown() and "CAM mass on the digit" in result.to_markdown()


def check_cam_mass(agreement, cams, split, pixels):
    """The CAM mass on the object, one sample at a time (the true class's CAM, the mask pooled
    to the CAM's cells), against what the evaluation reported."""
    shares = []
    for i in range(len(split)):
        cam = cams[i, split.labels[i]]
        weights = (cam - cam.min()) / (cam.max() - cam.min() + 1e-5)
        h = cam.shape[0]
        cell = pixels[i].reshape(h, pixels.shape[1] // h, h, pixels.shape[2] // h).mean((1, 3))
        if weights.sum() > 0:  # a constant CAM has no mass to place
            shares.append(((weights * cell).sum() / weights.sum()).item())
    assert agreement.mass_in_object == pytest.approx(sum(shares) / len(shares), rel=1e-5)
    assert agreement.object_area == pytest.approx(pixels.mean().item(), rel=1e-5)
    assert 0 <= agreement.iou <= 1 and agreement.iou_threshold in [i / 10 for i in range(10)]


def test_resnet_cams_are_where_its_logits_come_from():
    torch.manual_seed(0)
    model = resnet18(5, width=4, stem="3x3").double().eval()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        logits, cams = model.forward_with_cams(x)
        assert cams.shape == (3, 5, 2, 2)
        assert torch.equal(logits, model(x))
        # The classifier is linear after the average pool: the CAM's mean is the logit.
        torch.testing.assert_close(cams.mean((2, 3)), logits, rtol=1e-12, atol=1e-12)
        # At H = W = 1 the last stage is one cell and the CAM is the logit itself.
        one_logits, one_cams = model.forward_with_cams(torch.rand(2, 3, 1, 1, dtype=torch.float64))
        torch.testing.assert_close(one_cams[:, :, 0, 0], one_logits, rtol=1e-12, atol=1e-12)


def test_resnet_evaluation_reports_its_cams_against_the_digits():
    torch.manual_seed(0)
    model = resnet18(5, width=4, stem="3x3").eval()
    split = synthetic_split(masks=True, size=32)
    result = evaluate(model, split, "test", batch_size=8)
    with torch.no_grad():
        _, cams = model.forward_with_cams(split.batch(torch.arange(len(split))))
    from occamnets.data.loaders import unpack_masks
    [output] = result.diagnostics
    assert output.name == "output" and output.gate_calibration is None
    check_cam_mass(output.cam, cams, split, unpack_masks(split.masks, 32).float())
    assert "| output |" in result.to_markdown()
    # Without object masks (a real dataset) there is nothing to compare the CAM with.
    assert evaluate(model, synthetic_split(), "test").diagnostics[0].cam is None


def test_cam_pictures_of_two_models_show_the_same_images(tmp_path):
    from occamnets.viz import save_cam_comparison
    torch.manual_seed(0)
    split = synthetic_split(size=32)
    occam = occam_resnet18(5, width=4, stem="3x3", backend="reference")
    resnet = resnet18(5, width=4, stem="3x3")
    occam_data = cam_picture_data(occam, split, count=2)
    resnet_data = cam_picture_data(resnet, split, count=2)
    assert resnet_data.column_names == ["output"] and resnet_data.exit_taken is None
    assert resnet_data.cams[0].shape == (2, 5, 4, 4)
    assert torch.equal(resnet_data.predictions[0], resnet(split.batch(torch.arange(2))).argmax(1))
    path = save_cam_comparison(str(tmp_path / "both.png"),
                               [("Occam", occam_data), ("ResNet", resnet_data)])
    assert os.path.getsize(path) > 0
    other = cam_picture_data(resnet, synthetic_split(count=5, size=32, classes=3), count=2)
    with pytest.raises(ValueError, match="other images"):
        save_cam_comparison(str(tmp_path / "mixed.png"), [("Occam", occam_data), ("R", other)])
    with pytest.raises(TypeError, match="an OccamNet or a ResNet"):
        cam_picture_data(torch.nn.Linear(3, 3), split)


def test_nonfinite_gates_are_counted_and_reported():
    torch.manual_seed(0)
    model = occam_resnet18(5, width=4, stem="3x3", backend="reference").eval()
    with torch.no_grad():
        model.exits[1].gate.net[-1].bias.fill_(float("nan"))
    result = evaluate(model, synthetic_split(), "test", batch_size=8, per_factor=False)
    assert result.nonfinite_samples == 37
    assert result.exit_counts[1] == 0          # a NaN gate never exits
    assert "37 samples had non-finite logits or gates" in result.to_markdown()


def test_group_accuracies_are_each_groups_own():
    split = synthetic_split()
    model = resnet18(5, width=4, stem="3x3").eval()
    result = evaluate(model, split, diagnostics=False)
    with torch.no_grad():
        correct = model(split.batch(torch.arange(len(split)))).argmax(1) == split.labels
    groups = split.groups
    by_hand = [correct[groups.index == g].float().mean().item() for g in range(groups.count)]
    assert result.group_count == groups.count and len(result.groups) == groups.count
    assert [g.accuracy for g in result.groups] == pytest.approx(by_hand)
    assert [g.images for g in result.groups] == groups.sizes.tolist()
    worst = min(range(groups.count), key=lambda g: by_hand[g])
    assert result.worst_group.accuracy == pytest.approx(by_hand[worst])
    assert result.worst_group.name == groups.names()[worst]
    assert result.mean_group_accuracy == pytest.approx(sum(by_hand) / len(by_hand))
    assert "Worst-group accuracy" in result.to_markdown()
    assert evaluate(model, split, diagnostics=False, per_group=False).worst_group is None


def test_without_the_every_exit_pass_the_accuracy_and_exits_are_the_same(monkeypatch):
    """per_exit=False (per-epoch validation) leaves out the untimed every-exit pass and only
    what it gives; the early-exit accuracy and exit shares are the same."""
    torch.manual_seed(0)
    model = occam_resnet18(5, width=4, stem="3x3").eval()
    split = synthetic_split()
    full = evaluate(model, split, "val", batch_size=8, per_factor=False)
    import occamnets.evaluate as evaluate_module
    monkeypatch.setattr(evaluate_module, "_every_exit", lambda *a, **k: pytest.fail(
        "the every-exit pass ran with per_exit=False"))
    quick = evaluate(model, split, "val", batch_size=8, per_factor=False, per_exit=False)
    assert quick.accuracy == full.accuracy and quick.exit_counts == full.exit_counts
    assert full.exit_accuracy_all_samples is not None and full.diagnostics
    assert quick.exit_accuracy_all_samples is None and not quick.diagnostics
    assert "| E1 |" in quick.to_markdown()  # still renders, "-" for what was not measured


@pytest.mark.parametrize("kind", ["occam", "resnet"])
def test_judging_a_model_in_training_leaves_it_training_and_unchanged(kind):
    """evaluate, cam_picture_data and classify run in eval mode without autograd and give the
    model back in the mode it came in: a trainer's model keeps training, BatchNorm's running
    statistics do not move."""
    from occamnets.evaluate import classify
    from occamnets.models import build_model
    torch.manual_seed(0)
    model = build_model(kind, 5, 4, "3x3", "reference")
    split = synthetic_split(count=9)
    x = split.batch(torch.arange(len(split)))
    expected = classify(model.eval(), x)
    model.train()
    model.stages[0].eval()   # a module in its own mode keeps it too
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = classify(model, x)
    assert not got.logits.requires_grad and torch.equal(got.logits, expected.logits)
    evaluate(model, split, "test", batch_size=4)
    cam_picture_data(model, split, count=3)
    assert [m.training for m in model.modules()] == modes
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_pictures_say_what_a_reader_cannot_see(tmp_path, monkeypatch):
    """A non-finite CAM drew the bare image unremarked, the overlay stretched each CAM again
    (no fixed 0..1 scale) and nothing said each CAM is scaled on its own; E0, never used at
    inference, was labelled 0% like an exit no sample took; an exit with no samples had
    "ECE nan%"."""
    pytest.importorskip("matplotlib", reason="the pictures need matplotlib")
    import occamnets.viz as viz
    from occamnets.evaluate import CamPictureData
    from occamnets.metrics import Reliability
    figures = []
    real_save = viz._save
    monkeypatch.setattr(viz, "_save", lambda fig, path, dpi: (figures.append(fig),
                                                             real_save(fig, path, dpi))[1])
    images = torch.rand(1, 3, 16, 16)
    cams = [torch.rand(1, 3, 4, 4), torch.full((1, 3, 4, 4), float("nan"))]
    data = CamPictureData(images, torch.tensor([1]), ["E1", "E2"], cams,
                          [torch.tensor([1])] * 2, [0])
    viz.save_cam_grid(str(tmp_path / "cams.png"), data)
    cam_figure = figures[-1]
    assert "each CAM min-max scaled on its own" in cam_figure._suptitle.get_text()
    finite_panel, nonfinite_panel = cam_figure.axes[1], cam_figure.axes[2]
    assert finite_panel.images[1].get_clim() == (0.0, 1.0)
    assert "non-finite CAM" in nonfinite_panel.get_title()
    assert "non-finite" not in finite_panel.get_title()

    viz.save_exit_distribution(str(tmp_path / "exits.png"), [0, 3, 0, 7], [None, 0.5, None, 0.1],
                               first_inference_exit=1)
    axis = figures[-1].axes[0]
    assert "not used at" in axis.get_xticklabels()[0].get_text()
    assert [t.get_text() for t in axis.texts] == ["30%\nacc 50%", "0%", "70%\nacc 10%"]

    empty = Reliability(float("nan"), [0] * 10, [None] * 10, [None] * 10)
    assert "no samples" in _reliability_title(viz, empty, tmp_path)


def _reliability_title(viz, reliability, tmp_path):
    import matplotlib.pyplot as plt
    fig, axis = plt.subplots()
    viz._reliability_panel(axis, reliability, "E0 class softmax")
    title = axis.get_title()
    plt.close(fig)
    return title
