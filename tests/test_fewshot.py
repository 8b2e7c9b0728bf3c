"""Few-shot probe and kNN monitor: the math against scikit-learn, the picks, the config and the command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.fewshot.knn import knn_predict
from pretrain.fewshot.probe import LinearProbe, fit_probe, holdout_mask, pick_shots, select_l2

REPO = Path(__file__).resolve().parents[1]


def clusters(classes: int, per_class: int, dim: int, seed: int, draw: int = 0, spread: float = 2.0):
    """Gaussian blobs with overlapping classes (accuracy well between chance and 1); ``draw`` picks new
    samples of the same classes (``seed``)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * spread / dim ** 0.25
    scales = rng.uniform(0.5, 3.0, size=dim)
    labels = np.repeat(np.arange(classes), per_class)
    noise = np.random.default_rng((seed, draw)).normal(size=(len(labels), dim))
    features = centres[labels] + noise * scales
    return features.astype(np.float32), labels


def sklearn_ridge_predictions(train, labels, test, classes, l2):
    """The reference, written out independently: big_vision's standardisation (std + 1e-5), a bias column
    of 100, ±1 targets from scikit-learn's LabelBinarizer, scikit-learn's Ridge without intercept."""
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import LabelBinarizer

    train, test = train.astype(np.float64), test.astype(np.float64)
    mean, std = train.mean(0), train.std(0) + 1e-5
    with_bias = lambda x: np.hstack([(x - mean) / std, np.full((len(x), 1), 100.0)])  # noqa: E731
    y = LabelBinarizer(neg_label=-1, pos_label=1).fit(np.arange(classes)).transform(labels)
    ridge = Ridge(alpha=l2, fit_intercept=False, solver="cholesky").fit(with_bias(train), y)
    return ridge.predict(with_bias(test)).argmax(1), ridge.coef_.T


@pytest.mark.parametrize("per_class,dim", [(25, 32), (2, 96)], ids=["more-images-than-dims", "kernel-form"])
@pytest.mark.parametrize("l2", [2.0 ** 6, 2.0 ** 10])
def test_probe_predictions_equal_sklearn_ridge(per_class, dim, l2):
    classes = 10
    train, labels = clusters(classes, per_class, dim, seed=1)
    test, test_labels = clusters(classes, 40, dim, seed=1, draw=1)
    probe = fit_probe(torch.from_numpy(train), torch.from_numpy(labels), classes, l2)
    expected, coef = sklearn_ridge_predictions(train, labels, test, classes, l2)
    np.testing.assert_allclose(probe.weights.numpy(), coef, rtol=1e-7, atol=1e-10)
    assert (probe.predict(torch.from_numpy(test)).numpy() == expected).all()
    accuracy = (expected == test_labels).mean()
    assert 0.15 < accuracy < 1.0, accuracy  # neither chance nor trivially separable: predictions can differ


def test_probe_pack_round_trip():
    train, labels = clusters(4, 6, 8, seed=2)
    probe = fit_probe(torch.from_numpy(train), torch.from_numpy(labels), 4, 1024.0)
    back = LinearProbe.unpack(probe.pack(), 8, 4)
    assert all(torch.equal(a, b) for a, b in zip((probe.mean, probe.std, probe.weights),
                                                     (back.mean, back.std, back.weights)))


def test_l2_selection_is_the_best_held_out_sklearn_fit():
    classes, shots, grid = 8, 10, [2.0 ** e for e in range(6, 11)]
    train, labels = clusters(classes, shots, 48, seed=3, spread=3.0)
    held = holdout_mask(torch.from_numpy(labels), shots).numpy()
    assert held.sum() == classes * 2 and all(held[labels == c].sum() == 2 for c in range(classes))
    scores = [((sklearn_ridge_predictions(train[~held], labels[~held], train[held], classes, l2)[0]
                == labels[held]).mean(), l2) for l2 in grid]
    features, targets = torch.from_numpy(train), torch.from_numpy(labels)
    assert select_l2(features, targets, classes, shots, grid, default=1024.0) == max(scores)[1]
    assert select_l2(features, targets, classes, 1, grid, default=1024.0) == 1024.0
    assert select_l2(features, targets, classes, shots, [], default=512.0) == 512.0


def test_picks_are_seeded_nested_and_per_class():
    labels = np.repeat(np.arange(5), 30)
    labels[:3] = -1  # class 0 keeps 27 readable images
    np.random.default_rng(0).shuffle(labels)
    picks = pick_shots(labels, 25, seed=0, salt="mnist")
    assert picks.shape == (5, 25) and len(np.unique(picks)) == picks.size
    assert all((labels[row] == c).all() for c, row in enumerate(picks))
    assert np.array_equal(picks, pick_shots(labels, 25, seed=0, salt="mnist"))
    assert not np.array_equal(picks, pick_shots(labels, 25, seed=1, salt="mnist"))
    assert not np.array_equal(picks, pick_shots(labels, 25, seed=0, salt="pets"))
    with pytest.raises(ValueError, match="fewer than 28 images"):
        pick_shots(labels, 28, seed=0, salt="mnist")
    bank = pick_shots(labels, 28, seed=0, salt="mnist", exact=False)
    assert [int((row >= 0).sum()) for row in bank] == [27, 28, 28, 28, 28]


def sklearn_knn_predictions(bank, bank_labels, queries, classes, k, temperature):
    """The reference: brute-force cosine neighbours from scikit-learn, DINO's exp(sim / T) vote."""
    from sklearn.neighbors import NearestNeighbors

    neighbours = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(bank)
    distance, index = neighbours.kneighbors(queries)
    votes = np.zeros((len(queries), classes))
    for row, (d, i) in enumerate(zip(distance, index)):
        np.add.at(votes[row], bank_labels[i], np.exp((1.0 - d) / temperature))
    return votes.argmax(1)


@pytest.mark.parametrize("k,temperature", [(20, 0.07), (5, 0.5), (1, 0.07)])
def test_knn_equals_sklearn_brute_force_cosine(k, temperature):
    classes = 10
    bank, bank_labels = clusters(classes, 30, 24, seed=4)
    queries, query_labels = clusters(classes, 50, 24, seed=4, draw=1)
    expected = sklearn_knn_predictions(bank, bank_labels, queries, classes, k, temperature)
    got = knn_predict(torch.from_numpy(bank), torch.from_numpy(bank_labels), torch.from_numpy(queries), classes,
                      k=k, temperature=temperature).numpy()
    assert (got == expected).all()
    assert 0.15 < (expected == query_labels).mean() < 1.0


# ------------------------------------------------------------- config and preflight


def _config(demo_shards, *overrides):
    from pretrain.config import load_config

    return load_config("configs/pretrain/demo.yaml", [f"data.train_shards={demo_shards}",
                                                       f"data.eval_shards={demo_shards}", *overrides])


def _preflight_error(cfg) -> str:
    from pretrain.config import ConfigError
    from pretrain.preflight import preflight

    cfg.validate(1)
    with pytest.raises(ConfigError) as info:
        preflight(cfg, 1)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_monitor_datasets_pass_preflight_with_per_dataset_shots(demo_shards, tmp_path):
    from pretrain.preflight import preflight

    cfg = _config(demo_shards, f"eval.fewshot.datasets={{digits: {demo_shards}, few: {{shards: {demo_shards}, "
                               "shots: [1, 100]}}", f"eval.knn.datasets={{digits: {demo_shards}}}")
    cfg.validate(1)
    preflight(cfg, 1)
    assert cfg.eval.fewshot.parsed()["few"].shots == [1, 100]
    message = _preflight_error(_config(demo_shards, f"eval.fewshot.datasets={{few: {{shards: {demo_shards}, "
                                                    "shots: [1, 160]}}"))
    assert message.startswith("eval.fewshot.datasets.few: 160 shots need 160 train images a class, but class ")
    assert "give it shots: [...] of at most" in message


@pytest.mark.parametrize("entry, expected", [
    ("{{digits: {missing}}}", "eval.fewshot.datasets.digits.shards={missing}: {missing}/_info.json does not exist"),
    ("{{digits: {{shards: {demo}, val_split: test}}}}", "eval.fewshot.datasets.digits.shards={demo}: "),
], ids=["no-directory", "no-such-split"])
def test_monitor_dataset_paths_and_splits_fail_preflight(demo_shards, tmp_path, entry, expected):
    fill = dict(missing=tmp_path / "nowhere", demo=demo_shards)
    message = _preflight_error(_config(demo_shards, "eval.fewshot.datasets=" + entry.format(**fill)))
    assert message.startswith(expected.format(**fill)), message
    knn = _preflight_error(_config(demo_shards, "eval.knn.datasets=" + entry.format(**fill)))
    assert knn.startswith(expected.format(**fill).replace("eval.fewshot", "eval.knn")), knn


@pytest.mark.parametrize("override, expected", [
    ("eval.knn.k=0", "eval.knn.k=0 must be at least 1"),
    ("eval.fewshot.shots=[0, 5]", "eval.fewshot shots for digits must be positive"),
    ("eval.fewshot.l2_grid=[64, -1]", "eval.fewshot.l2_grid=[64.0, -1.0] must be positive values"),
    ("eval.knn.datasets={digits: /elsewhere}", "eval.knn.datasets.digits differs from eval.fewshot.datasets.digits"),
    ("eval.fewshot.datasets={digits: {shard: x}}", "config: eval.fewshot.datasets.digits.shard: unknown key 'shard'; "
                                                   "did you mean 'shards'?"),
])
def test_monitor_settings_are_validated_with_the_config(demo_shards, override, expected):
    from pretrain.config import ConfigError

    cfg = _config(demo_shards, f"eval.fewshot.datasets={{digits: {demo_shards}}}", override)
    with pytest.raises(ConfigError) as info:
        cfg.validate(1)
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


# ------------------------------------------------------------- the monitor on real shards


def _reference_features(model, directory, split, data_cfg, img_size):
    """Every sample of a split in manifest order, read by webdataset, through ``forward_head(pre_logits=True)``."""
    import webdataset as wds

    from data_tools.manifest import read_split
    from pretrain.data.transforms import BatchPreprocessor, build_eval_transform

    transform, preprocess = build_eval_transform(data_cfg, img_size), BatchPreprocessor(data_cfg, 10)
    files = read_split(directory, split)
    images, labels = [], []
    for sample in wds.WebDataset([str(p) for p in files.shards], shardshuffle=False, empty_check=False):
        images.append(transform(sample["png"]))
        labels.append(int(sample["cls"]))
    x, _ = preprocess(torch.stack(images), torch.tensor(labels), "cpu", train=False)
    model.eval()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    return features.numpy(), np.array(labels)


def test_monitor_figures_equal_a_reference_built_from_webdataset_and_sklearn(demo_shards, tmp_path):
    """The whole in-loop path (tar-header catalog, picks, rank-shared extraction, probe, kNN) against a
    reference that shares none of it: webdataset reads, ``forward_head(pre_logits=True)``, scikit-learn."""
    from pretrain.fewshot.monitor import Monitor
    from pretrain.model import build_vit

    cfg = _config(demo_shards, f"eval.fewshot.datasets={{digits: {demo_shards}}}", "eval.fewshot.shots=[1, 5]",
                  "eval.fewshot.seeds=2", f"eval.knn.datasets={{digits: {demo_shards}}}", "eval.knn.bank_per_class=30",
                  "data.num_workers=0", "eval.fewshot.batch_size=64")
    torch.manual_seed(0)
    model = build_vit(cfg.model.variant, **cfg.model.build_kwargs())  # demo head: tanh pre-logits layer of 96
    monitor = Monitor(cfg.eval.fewshot, cfg.eval.knn, cfg.data, cfg.model.img_size, 0, 1, torch.device("cpu"),
                      run_dir=tmp_path)
    record = monitor.evaluate(model, step=7)
    again = monitor.evaluate(model, step=7)
    assert (again.fewshot, again.knn) == (record.fewshot, record.knn)

    train, train_labels = _reference_features(model, demo_shards, "train", cfg.data, cfg.model.img_size)
    val, val_labels = _reference_features(model, demo_shards, "val", cfg.data, cfg.model.img_size)
    for shots in (1, 5):
        expected = []
        for seed in range(2):
            chosen = pick_shots(train_labels, 5, seed, "digits")[:, :shots].ravel()
            predicted, _ = sklearn_ridge_predictions(train[chosen], train_labels[chosen], val, 10, 1024.0)
            expected.append((predicted == val_labels).mean())
        assert record.fewshot["digits"][f"{shots}shot"]["seeds"] == pytest.approx(expected, abs=1e-12)
    bank = pick_shots(train_labels, 30, 0, "digits/knn", exact=False).ravel()
    knn = (sklearn_knn_predictions(train[bank], train_labels[bank], val, 10, 20, 0.07) == val_labels).mean()
    assert record.knn["digits"]["top1"] == pytest.approx(knn, abs=1e-12)
    assert record.scalars()["fewshot/digits/5shot"] == pytest.approx(np.mean(expected))
    picked = np.r_[pick_shots(train_labels, 5, 0, "digits").ravel(), pick_shots(train_labels, 5, 1, "digits").ravel()]
    assert record.images == len(np.unique(np.r_[picked, bank])) + len(val_labels)


# ------------------------------------------------------------- sources of the command


@pytest.mark.parametrize("pool, pre_logits", [("token", None), ("token", 48), ("gap", None)])
def test_architecture_is_read_off_timm_named_weights(tmp_path, pool, pre_logits):
    from safetensors.torch import save_file

    from pretrain.config import DataConfig
    from pretrain.data.transforms import BatchPreprocessor
    from pretrain.fewshot.features import extract
    from pretrain.fewshot.source import config_from_state_dict, load_source
    from pretrain.model import build_vit

    model = build_vit("S/16", img_size=64, num_classes=7, pre_logits=pre_logits, pool=pool, depth=2)
    config = model.config.to_dict()
    read = config_from_state_dict(model.state_dict())
    assert {key: config[key] for key in read} == read
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    loaded = load_source(str(tmp_path / "model.safetensors"))
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    args = (BatchPreprocessor(DataConfig(), 1), torch.device("cpu"), torch.float32, 64)
    ours, _ = extract(loaded, [(x, torch.arange(3))], *args)
    expected, _ = extract(model, [(x, torch.arange(3))], *args)
    assert torch.equal(ours, expected) and ours.shape == (3, 384)


def test_timm_weights_give_timms_pre_logits_features(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from pretrain.fewshot.features import pre_logits_hook
    from pretrain.fewshot.source import load_source

    reference = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=2,
                                                                  num_heads=3, num_classes=5).eval()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "model.safetensors"))
    model = load_source(str(tmp_path))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), pre_logits_hook(model) as captured:
        model(x)
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
    torch.testing.assert_close(captured[0], expected, rtol=1e-5, atol=1e-5)


def test_source_errors_say_what_is_accepted(tmp_path):
    from pretrain.fewshot.source import SourceError, load_source

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="is not a .safetensors file, a directory with model.safetensors"):
        load_source(str(tmp_path))
    with pytest.raises(SourceError, match="does not exist"):
        load_source(str(tmp_path / "missing"))


@pytest.mark.parametrize("recipe", ["vit_b16_i21k.yaml", "vit_l16_i21k.yaml", "vit_h14_i21k_zero3.yaml", "demo.yaml"])
def test_commented_monitor_blocks_of_the_recipes_load(recipe):
    """The commented ``eval.fewshot`` / ``eval.knn`` blocks are valid config once uncommented."""
    import json

    import yaml

    from pretrain.config import apply_overrides, load_config

    text = (REPO / "configs" / "pretrain" / recipe).read_text().splitlines()
    start = text.index("  # fewshot:")
    block = []
    for line in text[start:]:
        if not line.startswith("  # "):
            break
        block.append(line[4:])
    sections = yaml.safe_load("\n".join(block))
    cfg = apply_overrides(load_config(REPO / "configs" / "pretrain" / recipe),
                          [f"eval.{name}={json.dumps(section)}" for name, section in sections.items()])
    assert cfg.eval.errors() == [] and cfg.eval.fewshot.every_steps and cfg.eval.knn.k == 20
