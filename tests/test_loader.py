"""Batches (exact evaluation cover, equal training shards, resumable), seeded augmentation from
any thread, and the resize cache with `prepare`."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leaf_xla import loader
from leaf_xla.commands import prepare
from leaf_xla.data import DecodeError, Problems, decode, read_dataset
from leaf_xla.errors import UserError
from leaf_xla.loader import (
    BatchLoader,
    LeafImages,
    ResizeCache,
    default_cache_root,
    eval_batches,
    train_batches,
)
from leaf_xla.transforms import create_transform

SIZE = 16


def jitter() -> object:
    """Flips plus a continuous random change, so that equal outputs mean equal random draws."""
    return create_transform(0.5, 0.5, [{"RandomBrightnessContrast": {"p": 1.0}}])


@pytest.mark.parametrize("loaders", [1, 2, 3])
@pytest.mark.parametrize("n", [29, 24])
def test_eval_batches_cover_every_sample_once(n, loaders):
    batch = 4
    shards = [eval_batches(n, batch, loaders, rank) for rank in range(loaders)]
    assert len({len(s) for s in shards}) == 1  # every loader runs the same number of steps
    keys = [k for shard in shards for b in shard for k in b]
    assert all(len(b) == batch for shard in shards for b in shard)
    assert all(seed is None for _, seed in keys)
    positions = [p for p, _ in keys]
    assert sorted(p for p in positions if p < n) == list(range(n))
    padding = len(positions) - n
    assert 0 <= padding < batch * loaders


@pytest.mark.parametrize("loaders", [1, 2, 3])
def test_train_batches_equal_disjoint_shards(loaders):
    n, batch = 29, 4
    shards = [train_batches(n, batch, loaders, rank, seed=3, epoch=1) for rank in range(loaders)]
    steps = n // (batch * loaders)
    assert [len(s) for s in shards] == [steps] * loaders
    positions = [p for shard in shards for b in shard for p, _ in b]
    assert all(len(b) == batch for shard in shards for b in shard)
    assert len(positions) == len(set(positions)) == steps * batch * loaders
    assert all(0 <= p < n for p in positions)
    # Deterministic per (seed, epoch); another epoch or seed shuffles differently.
    again = [train_batches(n, batch, loaders, rank, seed=3, epoch=1) for rank in range(loaders)]
    assert again == shards
    assert train_batches(n, batch, loaders, 0, seed=3, epoch=2) != shards[0]
    assert train_batches(n, batch, loaders, 0, seed=4, epoch=1) != shards[0]
    # A resumed epoch is the tail of the full one.
    for start in range(steps + 1):
        assert train_batches(n, batch, loaders, 0, 3, 1, start_batch=start) == shards[0][start:]


def test_train_batches_need_one_global_batch():
    with pytest.raises(UserError, match="fewer than one global batch"):
        train_batches(7, 4, 2, 0, seed=0, epoch=0)


@pytest.fixture(scope="module")
def images(pp2020) -> LeafImages:
    data = read_dataset(pp2020)
    return LeafImages(data.train.paths[:10], data.train.targets[:10], SIZE, jitter)


def test_padded_batches_are_masked(images):
    keys = [k for b in eval_batches(10, 4, 1, 0) for k in b]
    batches = list(BatchLoader(images, eval_batches(10, 4, 1, 0), workers=2))
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["image"].dtype == torch.uint8
        assert batch["target"].shape == (4, 4) and batch["mask"].shape == (4,)
    image = np.concatenate([b["image"].numpy() for b in batches])
    target = np.concatenate([b["target"].numpy() for b in batches])
    index = np.concatenate([b["index"].numpy() for b in batches])
    mask = np.concatenate([b["mask"].numpy() for b in batches])
    assert index.tolist() == [*range(10), -1, -1] and mask.tolist() == [1] * 10 + [0, 0]
    assert not image[10:].any() and not target[10:].any()
    assert np.array_equal(target[:10], images.targets)
    for (position, _), got in zip(keys[:10], image):
        assert np.array_equal(got, decode(images.paths[position], SIZE)[0].transpose(2, 0, 1))


def test_augmentation_is_the_same_from_any_thread(images):
    keys = [(k % 10, 1000 + k) for k in range(24)]
    alone = [images.image(*key) for key in keys]
    with ThreadPoolExecutor(4) as pool:  # other threads, other order, their own transforms
        threaded = list(pool.map(lambda key: images.image(*key), keys[::-1]))[::-1]
    assert all(np.array_equal(a, b) for a, b in zip(alone, threaded))
    # Really random: the seeds of one image give different results.
    assert len({alone[k].tobytes() for k in range(0, 24, 10)}) == 3
    batches = train_batches(10, 2, 1, 0, seed=0, epoch=0)
    one = [b["image"] for b in BatchLoader(images, batches, workers=1)]
    three = [b["image"] for b in BatchLoader(images, batches, workers=3, prefetch=1)]
    assert all(np.array_equal(a, b) for a, b in zip(one, three))


def test_decode_error_reaches_the_training_loop(tmp_path):
    path = tmp_path / "bad.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg \xff\xd9")
    loader = BatchLoader(LeafImages([path], np.eye(2, dtype=np.float32)[:1], SIZE), [[(0, None)]])
    with pytest.raises(DecodeError, match="bad.jpg: cannot decode image"):
        list(loader)


# --- the resize cache ---------------------------------------------------------------------


@pytest.fixture
def data_dir(pp2020, tmp_path):
    return shutil.copytree(
        pp2020, tmp_path / "data", ignore=shutil.ignore_patterns(".leaf_xla_cache")
    )


def test_cache_is_used_while_fresh_and_rebuilt_when_stale(data_dir):
    paths = read_dataset(data_dir).train.paths[:6]
    cache = ResizeCache(default_cache_root(data_dir), SIZE)
    assert cache.dir == data_dir / ".leaf_xla_cache" / f"{SIZE}px"
    assert cache.stale(paths) == paths
    assert cache.build(paths, 2, Problems()) == 6
    assert cache.stale(paths) == []
    for path in paths:
        assert np.array_equal(np.load(cache.entry(path)), decode(path, SIZE)[0])

    # The loader reads the entry, not the JPEG: a marked entry comes back.
    marked = np.full((SIZE, SIZE, 3), 7, np.uint8)
    np.save(cache.entry(paths[0]), marked)
    reopened = ResizeCache(default_cache_root(data_dir), SIZE)
    assert np.array_equal(LeafImages(paths, None, SIZE, cache=reopened).image(0, None), marked)

    # A newer image file is not trusted to its entry: decoded, and its entry replaced.
    old_entry = cache.entry(paths[0])
    stat = paths[0].stat()
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert reopened.stale(paths) == [paths[0]]
    fresh = decode(paths[0], SIZE)[0]
    assert np.array_equal(LeafImages(paths, None, SIZE, cache=reopened).image(0, None), fresh)
    assert reopened.stale(paths) == [] and not old_entry.exists()
    assert np.array_equal(np.load(reopened.entry(paths[0])), fresh)
    # A damaged entry (cut short, another shape) is decoded again, not trusted.
    np.save(reopened.entry(paths[1]), marked[:4])
    assert np.array_equal(
        LeafImages(paths, None, SIZE, cache=reopened).image(1, None), decode(paths[1], SIZE)[0]
    )
    # Another size is another cache.
    assert LeafImages(paths, None, SIZE * 2, cache=reopened).cache is None


def test_first_epoch_fills_the_cache_each_image_decoded_once(data_dir, monkeypatch):
    """Two loaders as two processes of one host: over two epochs of their shards and an
    evaluation, every image is decoded and written once, by the loader whose shard holds it,
    and the batches are the same as without a cache."""
    data = read_dataset(data_dir)
    paths, targets = data.train.paths[:27], data.train.targets[:27]  # 3 left out each epoch
    shards = [
        (epoch, rank, train_batches(27, 4, 2, rank, seed=1, epoch=epoch))
        for epoch in range(2)
        for rank in range(2)
    ]
    plain = LeafImages(paths, targets, SIZE, jitter)
    want = [[b["image"] for b in BatchLoader(plain, batches)] for _, _, batches in shards]

    decoded: list[Path] = []
    written: list[Path] = []
    real_write = ResizeCache.write

    def counting_decode(path, size):
        decoded.append(path)
        return decode(path, size)

    def counting_write(self, path, array, stamp):
        written.append(path)
        real_write(self, path, array, stamp)

    monkeypatch.setattr(loader, "decode", counting_decode)
    monkeypatch.setattr(ResizeCache, "write", counting_write)
    root = default_cache_root(data_dir)
    processes = [
        LeafImages(paths, targets, SIZE, jitter, ResizeCache(root, SIZE)) for _ in range(2)
    ]
    for (_, rank, batches), expected in zip(shards, want):
        got = [b["image"] for b in BatchLoader(processes[rank], batches, workers=2)]
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert len(decoded) == len(set(decoded)) >= 24  # epoch 0's 24, epoch 1 the rest it has
    for rank, images in enumerate(processes):
        list(BatchLoader(images, eval_batches(27, 4, 2, rank), workers=2))
    assert sorted(decoded) == sorted(written) == sorted(paths)  # each once, all of them


def test_images_stay_in_ram_while_the_host_has_room(data_dir, monkeypatch):
    paths = read_dataset(data_dir).train.paths[:4]
    cache = ResizeCache(default_cache_root(data_dir), SIZE)
    monkeypatch.setattr(loader, "ram_room", lambda: 10 * SIZE * SIZE * 3)
    images = LeafImages(paths, None, SIZE, jitter, cache, in_ram=True)
    first = [images.image(k, 5) for k in range(4)]
    assert sorted(images.kept) == [0, 1, 2, 3]
    assert all(not a.flags.writeable for a in images.kept.values())  # no transform edits them
    shutil.rmtree(cache.dir)  # later epochs touch neither the cache nor the JPEGs
    assert all(np.array_equal(a, images.image(k, 5)) for k, a in enumerate(first))
    # A host short of memory keeps nothing more (and reads the cache instead).
    monkeypatch.setattr(loader, "ram_room", lambda: 0)
    short = LeafImages(paths, None, SIZE, cache=cache, in_ram=True)
    short.image(0, None)
    assert short.kept == {} and not short.in_ram and cache.is_fresh(paths[0])


def test_a_cache_that_cannot_be_written_warns_once(data_dir, capsys):
    paths = read_dataset(data_dir).train.paths[:3]
    root = data_dir / "not_a_folder"
    root.write_text("a file where the cache folder would go")
    images = LeafImages(paths, None, SIZE, cache=ResizeCache(root, SIZE))
    for k in range(3):
        assert np.array_equal(images.image(k, None), decode(paths[k], SIZE)[0])
    err = capsys.readouterr().err
    assert err.count("warning: resize cache") == 1 and "decoded every epoch" in err


def test_cache_keeps_same_named_files_of_two_folders_apart(tmp_path):
    paths = []
    for folder, colour in (("train_images", (250, 0, 0)), ("test_images", (0, 0, 250))):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "1000.jpg")
        Image.new("RGB", (32, 24), colour).save(paths[-1])
    cache = ResizeCache(tmp_path / "cache", SIZE)
    assert cache.build(paths, 1, Problems()) == 2
    red, blue = (np.load(cache.entry(p))[0, 0] for p in paths)
    assert red[0] > 200 and blue[2] > 200


def test_prepare_builds_then_only_refreshes(data_dir, capsys):
    prepare.main(["--data-dir", str(data_dir), "--size", str(SIZE), "--workers", "2"])
    assert "85 image(s) resized, 0 already fresh (64 train + 21 test)" in capsys.readouterr().out
    prepare.main(["--data-dir", str(data_dir), "--size", str(SIZE)])
    assert "0 image(s) resized, 85 already fresh" in capsys.readouterr().out
    Image.new("L", (96, 64)).save(data_dir / "images" / "Test_3.jpg")
    prepare.main(["--data-dir", str(data_dir), "--size", str(SIZE)])
    out, err = capsys.readouterr()
    assert "1 image(s) resized, 84 already fresh" in out
    assert "warning: " in err and "Test_3.jpg: grayscale image (mode L), converted to RGB" in err


def test_prepare_names_images_it_cannot_decode(data_dir, capsys):
    # JPEG start and end markers with no image between: only a decoder tells.
    for k in range(7):
        (data_dir / "images" / f"Train_{k}.jpg").write_bytes(b"\xff\xd8\xff\xe0 noise \xff\xd9")
    with pytest.raises(UserError, match=r"7 problems: \S+Train_0.jpg: cannot decode.*and 2 more"):
        prepare.main(["--data-dir", str(data_dir), "--size", str(SIZE)])
    # What did decode was kept: a rerun after a fix redoes the broken ones only.
    cache = ResizeCache(default_cache_root(data_dir), SIZE)
    assert len(cache.stale(read_dataset(data_dir).train.paths)) == 7


# --- the resize cache after a crash, a full disk, another host -------------------------------


def test_an_empty_or_cut_short_entry_is_a_miss_and_is_rewritten(data_dir):
    """What a power cut after an un-fsynced rename leaves: the entry's name with no bytes."""
    paths = read_dataset(data_dir).train.paths[:3]
    cache = ResizeCache(default_cache_root(data_dir), SIZE)
    cache.build(paths, 1, Problems())
    cache.entry(paths[0]).write_bytes(b"")
    entry = cache.entry(paths[1])
    entry.write_bytes(entry.read_bytes()[:-5])
    assert cache.stale(paths) == paths[:2]  # so prepare and --cache build redo them
    images = LeafImages(paths, None, SIZE, cache=ResizeCache(cache.dir.parent, SIZE))
    for k in (0, 1):
        want = decode(paths[k], SIZE)[0]
        assert np.array_equal(images.image(k, None), want)
        assert np.array_equal(np.load(cache.entry(paths[k])), want)  # rewritten whole
    cache.entry(paths[0]).write_bytes(b"")
    assert cache.build(paths, 1, Problems()) == 1 and cache.stale(paths) == []


def test_cache_entries_are_fsynced_before_and_after_the_rename(data_dir, monkeypatch):
    paths = read_dataset(data_dir).train.paths[:1]
    cache = ResizeCache(default_cache_root(data_dir), SIZE)
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))
    )
    cache.build(paths, 1, Problems())
    entry = cache.entry(paths[0])
    assert (
        len(synced) == 2 and synced[0].endswith(".tmp") and Path(synced[0]).parent == entry.parent
    )
    assert synced[1] == str(entry.parent)


@pytest.mark.parametrize("where", ["a file", "a file above", "read-only"])
def test_building_into_an_unwritable_cache_warns_once_and_goes_on(data_dir, capsys, where):
    paths = read_dataset(data_dir).train.paths[:3]
    root = data_dir / "cache"
    if where == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        root.mkdir()
        root.chmod(0o555)
    else:
        (data_dir / "cache").write_text("a file where a folder would go")
        root = root if where == "a file" else root / "below"
    problems = Problems()
    assert ResizeCache(root, SIZE).build(paths, 2, problems) == 3  # each decoded and checked
    assert not problems.errors
    err = capsys.readouterr().err
    assert err.count("warning: resize cache") == 1 and "cannot write" in err
    # prepare says that nothing was cached, and exits 0.
    prepare.main(["--data-dir", str(data_dir), "--size", str(SIZE), "--cache-dir", str(root)])
    out, err = capsys.readouterr()
    assert err.count("warning: resize cache") == 1 and "cannot be written; 85 image(s)" in out


FSIZE_SCRIPT = """
import resource, sys
from pathlib import Path
import numpy as np
from leaf_xla.data import decode
from leaf_xla.loader import LeafImages, ResizeCache
path, root, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # a disk that fills mid-write
images = LeafImages([path], None, 16, cache=ResizeCache(root, 16))
assert np.array_equal(images.image(0, None), decode(path, 16)[0])
"""


def test_a_write_cut_short_by_a_full_disk_is_never_installed(data_dir, tmp_path):
    path = read_dataset(data_dir).train.paths[0]
    root = tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-c", FSIZE_SCRIPT, str(path), str(root), str(SIZE * SIZE * 3 // 2)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning: resize cache") == 1 and "cannot write" in result.stderr
    cache = ResizeCache(root, SIZE)
    assert not cache.entry(path).exists() and cache.stale([path]) == [path]
    assert [p.name for p in cache.entry(path).parent.iterdir()] == []  # no temp file left


def test_temp_names_are_unique_across_hosts_and_never_clobbered(data_dir, monkeypatch):
    """Two hosts on a shared disk may run writers of equal pid and thread id."""
    paths = read_dataset(data_dir).train.paths[:1]
    cache = ResizeCache(default_cache_root(data_dir), SIZE)
    array, stamp = decode(paths[0], SIZE)[0], (1, 2)
    folder = cache.entry(paths[0], stamp).parent
    renamed: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda a, b: (renamed.append(Path(a).name), real_replace(a, b))
    )
    for host in ("host-a", "host-b"):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        cache.write(paths[0], array, stamp)
    assert "host-a" in renamed[0] and "host-b" in renamed[1]
    # A temp file of another writer that happens to hold the name drawn is left alone.
    theirs = folder / ".host-b-0bad.tmp"
    theirs.write_bytes(b"another writer's entry, in flight")
    tokens = iter(["0bad", "600d"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(tokens))
    cache.write(paths[0], array, stamp)
    assert renamed[-1] == ".host-b-600d.tmp"
    assert theirs.read_bytes() == b"another writer's entry, in flight"
    assert np.array_equal(np.load(cache.entry(paths[0], stamp)), array)


def test_building_removes_temp_files_that_killed_writers_left(data_dir):
    paths = read_dataset(data_dir).train.paths[:2]
    cache = ResizeCache(default_cache_root(data_dir), SIZE)
    cache.build(paths, 1, Problems())
    old, young = (cache.entry(p).parent / ".otherhost-1234abcd.tmp" for p in paths)
    for temp in (old, young):
        temp.write_bytes(b"half an entry")
    os.utime(old, (0, 0))  # long before any live write
    assert cache.build(paths, 1, Problems()) == 0
    assert not old.exists() and young.exists()  # a young one may be another host's, in flight


# --- RAM in a container ----------------------------------------------------------------------

GIB = 1 << 30


def fake_host(tmp_path: Path, own: str) -> tuple[Path, Path, Path]:
    """/proc/meminfo of a 64 GiB host with 60 GiB available, /proc/self/cgroup, and a cgroup
    folder to fill."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {64 * GIB >> 10} kB\nMemAvailable: {60 * GIB >> 10} kB\n")
    (tmp_path / "self_cgroup").write_text(own)
    return meminfo, tmp_path / "cgroup", tmp_path / "self_cgroup"


def limit(folder: Path, names: tuple[str, str, str], limit: str, used: int, cache: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / names[0]).write_text(f"{limit}\n")
    (folder / names[1]).write_text(f"{used}\n")
    (folder / "memory.stat").write_text(f"anon {used - cache}\n{names[2]} {cache}\n")


V2 = ("memory.max", "memory.current", "inactive_file")
V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def test_ram_room_is_capped_by_the_containers_memory_limit(tmp_path):
    host = (60 - 32) * GIB  # available less half the host's memory
    meminfo, root, own = fake_host(tmp_path, "0::/kubepods/pod1\n")
    assert loader.ram_room(meminfo, root, own) == host  # no cgroup files: the host's
    # A pod limited to 8 GiB, 3 GiB in use of which 1 GiB is reclaimable file cache: it may
    # grow to half its limit.
    limit(root / "kubepods" / "pod1", V2, str(8 * GIB), 3 * GIB, GIB)
    assert loader.ram_room(meminfo, root, own) == 8 * GIB - 2 * GIB - 4 * GIB
    limit(root / "kubepods", V2, str(6 * GIB), 3 * GIB, GIB)  # the parent's is tighter
    assert loader.ram_room(meminfo, root, own) == 6 * GIB - 2 * GIB - 3 * GIB
    limit(root / "kubepods", V2, "max", 3 * GIB, GIB)
    limit(root / "kubepods" / "pod1", V2, "max", 3 * GIB, GIB)
    assert loader.ram_room(meminfo, root, own) == host
    # A full container: nothing more.
    limit(root / "kubepods" / "pod1", V2, str(4 * GIB), 4 * GIB, 0)
    assert loader.ram_room(meminfo, root, own) == 0


def test_ram_room_reads_cgroup_v1_limits(tmp_path):
    meminfo, root, own = fake_host(tmp_path, "9:name=systemd:/\n4:memory:/docker/abc\n0::/\n")
    # Docker mounts the container's own memory cgroup at /sys/fs/cgroup/memory.
    limit(root / "memory", V1, str(8 * GIB), 3 * GIB, GIB)
    assert loader.ram_room(meminfo, root, own) == 8 * GIB - 2 * GIB - 4 * GIB
    limit(root / "memory", V1, str(9223372036854771712), 3 * GIB, GIB)  # v1's "no limit"
    assert loader.ram_room(meminfo, root, own) == (60 - 32) * GIB
