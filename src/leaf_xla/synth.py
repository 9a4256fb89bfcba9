"""Synthetic leaf images in the layouts of the Kaggle leaf competitions, for demos and tests.

Each class has a visual signature a small CNN can learn: rust is orange spots with a dark rim,
scab dark olive blotches, `multiple_diseases` both, healthy neither (other formats give every
disease class its own colour and spot shape). Deterministic per seed; no network. Layouts: the
three leaf competitions' and a generic `image_id,label` one with class names.
(`write_dataset`; the options are in commands/synth.py.)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from leaf_xla import formats
from leaf_xla.errors import SettingError, not_a_command
from leaf_xla.files import atomic_to_csv, atomic_write_text

# Plant Pathology 2020's train split: 516 healthy, 91 multiple_diseases, 622 rust, 592 scab.
PP2020_CLASSES = ("healthy", "multiple_diseases", "rust", "scab")
PP2020_FREQUENCIES = (516, 91, 622, 592)
PP2021_CLASSES = ("complex", "frog_eye_leaf_spot", "healthy", "powdery_mildew", "rust", "scab")
CASSAVA_CLASSES = (
    "Cassava Bacterial Blight (CBB)",
    "Cassava Brown Streak Disease (CBSD)",
    "Cassava Green Mottle (CGM)",
    "Cassava Mosaic Disease (CMD)",
    "Healthy",
)
# Any image competition's `image_id,label` with class names (the generic label format).
GENERIC_CLASSES = ("healthy", "leaf_blight", "powdery_mildew", "rust")
# Each layout's label format (see formats.py): train.csv and the sample submission are written
# by it, so that they are what reading them expects.
LAYOUT_FORMATS = {
    "pp2020": "onehot",
    "pp2021": "multilabel",
    "cassava": "integer",
    "generic": "generic",
}
FORMATS = tuple(LAYOUT_FORMATS)

# A spot style per disease: (fill RGB, rim RGB or None, radius as a fraction of the size, count
# range, blotchy). The first two are the Plant Pathology 2020 rust and scab.
SPOT_STYLES = {
    "rust": ((236, 132, 24), (120, 50, 10), 0.045, (5, 10), False),
    "scab": ((70, 72, 30), None, 0.07, (3, 6), True),
    "frog_eye_leaf_spot": ((200, 190, 170), (90, 40, 30), 0.05, (4, 8), False),
    "powdery_mildew": ((235, 235, 225), None, 0.09, (2, 4), True),
    "complex": ((150, 60, 140), None, 0.05, (4, 8), False),
}
EXTRA_STYLES = [
    ((200, 40, 40), None, 0.05, (4, 8), False),
    ((230, 220, 40), (60, 60, 0), 0.05, (4, 8), False),
    ((40, 40, 200), None, 0.06, (3, 6), True),
    ((250, 250, 250), (0, 0, 0), 0.04, (6, 10), False),
]


def _style(disease: str, order: int) -> tuple:
    return SPOT_STYLES.get(disease) or EXTRA_STYLES[order % len(EXTRA_STYLES)]


def draw_leaf(
    rng: np.random.Generator,
    size: tuple[int, int],
    diseases: Sequence[str],
    disease_order: dict[str, int],
    signal: float = 1.0,
) -> Image.Image:
    """One leaf on a noisy background with the spots of `diseases` on it, at opacity `signal`."""
    width, height = size
    background = rng.integers(60, 140, size=3)
    noise = rng.normal(0, 12, size=(height, width, 3))
    canvas = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)

    # The leaf: a rotated ellipse, a random shade of green, a midrib.
    cx, cy = width * rng.uniform(0.4, 0.6), height * rng.uniform(0.4, 0.6)
    ax, ay = width * rng.uniform(0.32, 0.42), height * rng.uniform(0.26, 0.36)
    angle = rng.uniform(0, np.pi)
    t = np.linspace(0, 2 * np.pi, 48)
    px = cx + ax * np.cos(t) * np.cos(angle) - ay * np.sin(t) * np.sin(angle)
    py = cy + ax * np.cos(t) * np.sin(angle) + ay * np.sin(t) * np.cos(angle)
    green = (int(rng.integers(40, 90)), int(rng.integers(120, 180)), int(rng.integers(30, 70)))
    draw.polygon(list(zip(px.tolist(), py.tolist())), fill=green)
    rib = [
        (cx - ax * np.cos(angle), cy - ax * np.sin(angle)),
        (cx + ax * np.cos(angle), cy + ax * np.sin(angle)),
    ]
    draw.line(rib, fill=(150, 190, 90), width=max(1, width // 100))

    scale = min(width, height)
    unspotted = image.copy() if signal < 1 else None
    for disease in diseases:
        fill, rim, radius, (low, high), blotchy = _style(disease, disease_order[disease])
        for _ in range(int(rng.integers(low, high + 1))):
            # Spots land on the leaf: a random point inside the ellipse.
            r, theta = np.sqrt(rng.uniform(0, 0.8)), rng.uniform(0, 2 * np.pi)
            sx = cx + r * (ax * np.cos(theta) * np.cos(angle) - ay * np.sin(theta) * np.sin(angle))
            sy = cy + r * (ax * np.cos(theta) * np.sin(angle) + ay * np.sin(theta) * np.cos(angle))
            spot = scale * radius * rng.uniform(0.7, 1.3)
            parts = 3 if blotchy else 1
            for _ in range(parts):
                ox, oy = rng.normal(0, spot * 0.5, 2) if blotchy else (0.0, 0.0)
                box = [sx + ox - spot, sy + oy - spot, sx + ox + spot, sy + oy + spot]
                draw.ellipse(box, fill=fill, outline=rim, width=max(1, int(spot / 3)) if rim else 0)
    if unspotted is not None:
        image = Image.blend(unspotted, image, signal)
    brightness = rng.uniform(0.8, 1.2)
    image = Image.fromarray(np.clip(np.asarray(image) * brightness, 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(radius=0.6))


def _pp2020_labels(rng: np.random.Generator, n: int) -> list[list[str]]:
    freq = np.array(PP2020_FREQUENCIES, dtype=float)
    # Every class at least twice, so that stratified folds and per-class AUC are defined.
    picks = list(np.repeat(np.arange(4), 2))[:n]
    picks += list(rng.choice(4, size=n - len(picks), p=freq / freq.sum()))
    picks = rng.permutation(picks)
    diseases = {0: [], 1: ["rust", "scab"], 2: ["rust"], 3: ["scab"]}
    return [[PP2020_CLASSES[c], *diseases[c]] for c in picks]


def _tables(
    label_format: formats.LabelFormat,
    classes: list[str],
    *,
    id_column: str,
    train_ids: list[str],
    label_sets: list[list[str]],
    test_ids: list[str],
    sample_class: str | None,
    with_test_csv: bool,
) -> dict[str, pd.DataFrame]:
    """train.csv, sample_submission.csv and (when the layout has one) test.csv, their labels
    written by the layout's label format."""
    index = {c: k for k, c in enumerate(classes)}
    targets = np.zeros((len(label_sets), len(classes)))
    for i, names in enumerate(label_sets):
        targets[i, [index[n] for n in names]] = 1
    train = label_format.label_frame(targets, classes)
    train.insert(0, id_column, train_ids)
    # The sample's placeholder answer: one class, or (no class given) uniform probabilities.
    probs = np.full((len(test_ids), len(classes)), 1 / len(classes))
    if sample_class is not None:
        probs = np.zeros_like(probs)
        probs[:, index[sample_class]] = 1
    sample = label_format.submission(pd.DataFrame(probs, columns=classes), threshold=0.5)
    sample.insert(0, id_column, test_ids)
    tables = {"train.csv": train, "sample_submission.csv": sample}
    if with_test_csv:
        tables["test.csv"] = pd.DataFrame({id_column: test_ids})
    return tables


@dataclass
class Layout:
    """A data set's files and labels in one competition's layout, before anything is drawn."""

    classes: Sequence[str]
    order: dict[str, int]  # each disease's spot style
    train_ids: list[str]
    test_ids: list[str]
    train_dir: Path
    test_dir: Path
    train_files: list[str]
    test_files: list[str]
    label_sets: list[list[str]]  # each training image's classes
    spot_lists: list[list[str]]  # the diseases drawn on it
    id_column: str = "image_id"
    with_test_csv: bool = False
    sample_class: str | None = None  # sample_submission's label (None: probabilities)


def _pp2020_layout(rng: np.random.Generator, out: Path, n_train: int, n_test: int) -> Layout:
    labels = _pp2020_labels(rng, n_train)
    train_ids = [f"Train_{i}" for i in range(n_train)]
    test_ids = [f"Test_{i}" for i in range(n_test)]
    return Layout(
        classes=PP2020_CLASSES,
        order={"rust": 0, "scab": 1},
        train_ids=train_ids,
        test_ids=test_ids,
        train_dir=out / "images",
        test_dir=out / "images",
        train_files=[f"{i}.jpg" for i in train_ids],
        test_files=[f"{i}.jpg" for i in test_ids],
        label_sets=[row[:1] for row in labels],
        spot_lists=[row[1:] for row in labels],
        with_test_csv=True,
    )


def _pp2021_layout(rng: np.random.Generator, out: Path, n_train: int, n_test: int) -> Layout:
    classes = PP2021_CLASSES
    diseases = [c for c in classes if c != "healthy"]
    label_sets = []
    for i in range(n_train):
        if i < len(classes):  # every class present
            label_sets.append([classes[i]])
        elif rng.uniform() < 0.3:
            label_sets.append(["healthy"])
        else:
            k = 1 if rng.uniform() < 0.8 else 2
            label_sets.append(sorted(rng.choice(diseases, size=k, replace=False).tolist()))
    if n_train > len(classes) and all(len(s) == 1 for s in label_sets):
        # One image with two diseases: one name in every row would read as single-label.
        label_sets[len(classes)] = sorted(diseases[:2])
    label_sets = [label_sets[i] for i in rng.permutation(n_train)]
    train_files = [f"{rng.integers(16**15):015x}{i:x}.jpg" for i in range(n_train)]
    test_files = [f"{rng.integers(16**15):015x}{i:x}t.jpg" for i in range(n_test)]
    return Layout(
        classes=classes,
        order={d: i for i, d in enumerate(diseases)},
        train_ids=train_files,
        test_ids=test_files,
        train_dir=out / "train_images",
        test_dir=out / "test_images",
        train_files=train_files,
        test_files=test_files,
        label_sets=label_sets,
        spot_lists=[[d for d in s if d != "healthy"] for s in label_sets],
        id_column="image",
        sample_class="healthy",
    )


def _cassava_layout(rng: np.random.Generator, out: Path, n_train: int, n_test: int) -> Layout:
    classes = CASSAVA_CLASSES
    ints = np.concatenate([np.arange(len(classes)), rng.choice(len(classes), n_train)])
    ints = rng.permutation(ints[:n_train])
    train_files = [f"{rng.integers(10**9)}{i}.jpg" for i in range(n_train)]
    test_files = [f"{rng.integers(10**9)}{i}t.jpg" for i in range(n_test)]
    atomic_write_text(
        out / "label_num_to_disease_map.json",
        json.dumps({str(i): c for i, c in enumerate(classes)}, indent=1),
    )
    return Layout(
        classes=classes,
        order={c: i for i, c in enumerate(classes)},
        train_ids=train_files,
        test_ids=test_files,
        train_dir=out / "train_images",
        test_dir=out / "test_images",
        train_files=train_files,
        test_files=test_files,
        label_sets=[[classes[c]] for c in ints],
        spot_lists=[[] if classes[c] == "Healthy" else [classes[c]] for c in ints],
        sample_class="Healthy",
    )


def _generic_layout(rng: np.random.Generator, out: Path, n_train: int, n_test: int) -> Layout:
    classes = GENERIC_CLASSES
    # Every class at least twice, so that stratified folds and per-class AUC are defined.
    picks = np.concatenate([np.repeat(np.arange(len(classes)), 2), rng.choice(4, n_train)])
    picks = rng.permutation(picks[:n_train])
    train_ids = [f"leaf_{i:04d}" for i in range(n_train)]
    test_ids = [f"query_{i:04d}" for i in range(n_test)]
    return Layout(
        classes=classes,
        order={c: i for i, c in enumerate(classes)},
        train_ids=train_ids,
        test_ids=test_ids,
        train_dir=out / "images",
        test_dir=out / "images",
        train_files=[f"{i}.jpg" for i in train_ids],
        test_files=[f"{i}.jpg" for i in test_ids],
        label_sets=[[classes[c]] for c in picks],
        spot_lists=[[] if classes[c] == "healthy" else [classes[c]] for c in picks],
        with_test_csv=True,
        sample_class="healthy",
    )


LAYOUTS = {
    "pp2020": _pp2020_layout,
    "pp2021": _pp2021_layout,
    "cassava": _cassava_layout,
    "generic": _generic_layout,
}


def write_dataset(
    out: Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    size: tuple[int, int] = (320, 213),
    fmt: str = "pp2020",
    quality: int = 90,
    signal: float = 1.0,
    label_noise: float = 0.0,
    test_labels: Path | None = None,
) -> Path:
    """Write a data set in the Kaggle layout `fmt`; return `out`.

    `signal`: the spots' opacity (1: as drawn); `label_noise`: the fraction of train labels
    replaced by another class; `test_labels`: a CSV (outside `out`) for the test images' labels.
    """
    _check_request(out, n_train, n_test, fmt, signal, label_noise, test_labels)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    layout = LAYOUTS[fmt](rng, out, n_train, n_test)
    clean, classes = layout.label_sets, list(layout.classes)
    label_sets = clean
    if label_noise:
        label_sets = _flip_labels(np.random.default_rng([seed, 1]), clean, classes, label_noise)
    label_format = formats.get(LAYOUT_FORMATS[fmt])
    tables = _tables(
        label_format,
        classes,
        id_column=layout.id_column,
        train_ids=layout.train_ids,
        label_sets=label_sets,
        test_ids=layout.test_ids,
        sample_class=layout.sample_class,
        with_test_csv=layout.with_test_csv,
    )
    layout.train_dir.mkdir(parents=True, exist_ok=True)
    layout.test_dir.mkdir(parents=True, exist_ok=True)
    for name, spots in zip(layout.train_files, layout.spot_lists):
        leaf = draw_leaf(rng, size, spots, layout.order, signal)
        leaf.save(layout.train_dir / name, quality=quality)
    # Test images follow the training distribution; their labels are written only to
    # `test_labels`, clean (the noise is the training labels').
    drawn_like = rng.integers(0, n_train, n_test)
    for name, i in zip(layout.test_files, drawn_like):
        leaf = draw_leaf(rng, size, layout.spot_lists[int(i)], layout.order, signal)
        leaf.save(layout.test_dir / name, quality=quality)
    for name, frame in tables.items():
        atomic_to_csv(frame, out / name)
    if test_labels is not None:
        index = {c: k for k, c in enumerate(classes)}
        targets = np.zeros((n_test, len(classes)))
        for row, i in enumerate(drawn_like):
            targets[row, [index[n] for n in clean[int(i)]]] = 1
        frame = label_format.label_frame(targets, classes)
        frame.insert(0, layout.id_column, layout.test_ids)
        test_labels.parent.mkdir(parents=True, exist_ok=True)
        atomic_to_csv(frame, test_labels)
    return out


def _check_request(
    out: Path,
    n_train: int,
    n_test: int,
    fmt: str,
    signal: float,
    label_noise: float,
    test_labels: Path | None,
) -> None:
    if n_train < 8:
        raise SettingError("n_train", f"must be at least 8 (got {n_train}): folds need every class")
    if n_test < 1:
        raise SettingError("n_test", f"must be at least 1 (got {n_test})")
    if not 0 < signal <= 1:
        raise SettingError("signal", f"must be in (0, 1], got {signal}")
    if not 0 <= label_noise < 1:
        raise SettingError("label_noise", f"must be in [0, 1), got {label_noise}")
    if fmt not in LAYOUTS:
        raise SettingError("format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if test_labels is not None and out.resolve() in test_labels.resolve().parents:
        raise SettingError(
            "test_labels", f"{test_labels} is inside {out}: the hidden labels go outside it"
        )


def _flip_labels(
    rng: np.random.Generator, label_sets: list[list[str]], classes: Sequence[str], fraction: float
) -> list[list[str]]:
    """`round(fraction * N)` label sets, chosen at random, replaced by one other class each."""
    flipped = [list(s) for s in label_sets]
    for i in rng.choice(len(flipped), size=round(fraction * len(flipped)), replace=False):
        others = [c for c in classes if [c] != flipped[i]]
        flipped[i] = [str(rng.choice(others))]
    return flipped


if __name__ == "__main__":  # the command is leaf_xla/commands/synth.py
    not_a_command("leaf_xla.synth", "synth")
