"""The on-disk feature cache."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from karyo.models import features as features_module  # noqa: E402
from karyo.errors import KaryoError  # noqa: E402
from karyo.models.features import cache_key, cached_features, image_digest  # noqa: E402
from tests.common import random_images  # noqa: E402

KEY = ["tiny", "none:seed=0", 16, "pooled"]


def tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3),
                             keras.layers.GlobalAveragePooling2D()])


@pytest.fixture
def counted(monkeypatch):
    """A tiny frozen part whose forward passes are counted (images per call)."""
    model = tiny_model()
    calls = []
    original = model.predict_on_batch

    def predict_on_batch(x):
        calls.append(len(x))
        return original(x)

    monkeypatch.setattr(model, "predict_on_batch", predict_on_batch)
    return model, calls


def test_computes_once_and_reuses_per_image(counted, tmp_path):
    model, calls = counted
    x = random_images(5, 16)
    first = cached_features(model, x, KEY, tmp_path, batch_size=2, progress=False)
    assert calls == [2, 2, 1]
    np.testing.assert_allclose(first, model(x.astype("float32")).numpy(), rtol=1e-6)
    assert first.dtype == np.float32 and first.shape == (5, 4)

    calls.clear()
    again = cached_features(model, x, KEY, tmp_path, progress=False)
    assert calls == [] and np.array_equal(again, first)

    more = np.concatenate([x[:3], random_images(2, 16, seed=1), x[3:]])  # two new images among old ones
    grown = cached_features(model, more, KEY, tmp_path, progress=False)
    assert calls == [2]
    np.testing.assert_allclose(grown, model(more.astype("float32")).numpy(), rtol=1e-6)
    assert np.array_equal(grown[[0, 1, 2, 5, 6]], first)

    files = sorted(p.name for p in next(tmp_path.iterdir()).iterdir())
    assert "key.json" in files and len([f for f in files if f.endswith(".npy")]) == 7
    assert not [f for f in files if f.startswith(".")]  # no temporary files left


def test_duplicates_are_computed_once(counted, tmp_path):
    model, calls = counted
    x = random_images(3, 16)
    out = cached_features(model, np.concatenate([x, x[:1]]), KEY, tmp_path, progress=False)
    assert calls == [3] and np.array_equal(out[0], out[3])


def test_key_separates_parts_and_networks(tmp_path):
    model = tiny_model(0)
    x = random_images(2, 16)
    k1, description = cache_key(model, KEY)
    assert cache_key(model, KEY)[0] == k1
    assert cache_key(model, KEY[:-1] + ["unfreeze1"])[0] != k1
    assert description["output_shape"] == [4] and description["key_parts"] == KEY
    # Same weights (same seed) give the same key; other weights a new one, whatever the parts say.
    assert cache_key(tiny_model(0), KEY)[0] == k1
    assert cache_key(tiny_model(1), KEY)[0] != k1
    a = cached_features(model, x, KEY, tmp_path, progress=False)
    b = cached_features(tiny_model(1), x, KEY, tmp_path, progress=False)
    assert not np.allclose(a, b)
    assert len(list(tmp_path.iterdir())) == 2


def test_seeded_backbones_share_a_key_unseeded_ones_do_not():
    from karyo.models.network import build_model, split_model

    keys = [cache_key(split_model(build_model("vgg16", 32, seed=seed), 0)[0], KEY)[0]
            for seed in (3, 3, None)]
    assert keys[0] == keys[1] != keys[2]


def test_damaged_entries_are_recomputed(counted, tmp_path):
    model, calls = counted
    x = random_images(2, 16)
    good = cached_features(model, x, KEY, tmp_path, progress=False)
    entry = next(tmp_path.iterdir()) / f"{image_digest(x[1])}.npy"
    entry.write_bytes(entry.read_bytes()[:20])  # truncated by a crash of another program
    calls.clear()
    again = cached_features(model, x, KEY, tmp_path, progress=False)
    assert calls == [1] and np.allclose(again, good)
    assert np.allclose(np.load(entry), good[1])


def test_a_failed_write_leaves_only_whole_files(counted, tmp_path, monkeypatch):
    model, _ = counted
    x = random_images(3, 16)
    real = features_module.atomic_write_bytes
    written = []

    def flaky(path, data):
        if path.suffix == ".npy" and len(written) == 1:
            raise OSError(28, "No space left on device")
        written.append(path)
        real(path, data)

    monkeypatch.setattr(features_module, "atomic_write_bytes", flaky)
    with pytest.raises(KaryoError, match="No space left on device"):
        cached_features(model, x, KEY, tmp_path, progress=False)
    folder = next(tmp_path.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == sorted(["key.json", written[0].name])
    monkeypatch.setattr(features_module, "atomic_write_bytes", real)
    out = cached_features(model, x, KEY, tmp_path, progress=False)
    np.testing.assert_allclose(out, model(x.astype("float32")).numpy(), rtol=1e-6)


def test_bad_input_is_refused(tmp_path):
    model = tiny_model()
    with pytest.raises(KaryoError, match="resize"):
        cached_features(model, np.zeros((2, 8, 8, 3), np.uint8), KEY, tmp_path)
    empty = cached_features(model, np.zeros((0, 16, 16, 3), np.uint8), KEY, tmp_path)
    assert empty.shape == (0, 4)
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    with pytest.raises(KaryoError, match="feature cache"):
        cached_features(model, random_images(1, 16), KEY, blocked / "cache", progress=False)


def test_two_workers_filling_one_cache(tmp_path):
    """keras-tuner workers share a cache: concurrent writers leave whole, equal files."""
    import threading

    x = random_images(12, 16)
    models = [tiny_model(0), tiny_model(0)]  # the same network in two workers: the same key
    results, errors = [None, None], []

    def work(i):
        try:
            results[i] = cached_features(models[i], x, KEY, tmp_path, batch_size=3, progress=False)
        except Exception as exc:  # reported below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    np.testing.assert_array_equal(results[0], results[1])
    folder = next(tmp_path.iterdir())
    assert len(list(tmp_path.iterdir())) == 1
    assert len(list(folder.glob("*.npy"))) == 12 and not list(folder.glob(".*"))
    np.testing.assert_array_equal(cached_features(models[0], x, KEY, tmp_path, progress=False),
                                  results[0])


def test_a_corrupted_entry_is_detected_recomputed_and_reported_once(counted, tmp_path, capsys):
    model, calls = counted
    x = random_images(3, 16)
    good = cached_features(model, x, KEY, tmp_path, progress=False)
    folder = next(tmp_path.iterdir())
    flipped = folder / f"{image_digest(x[0])}.npy"
    data = bytearray(flipped.read_bytes())
    data[-features_module.TRAILER_SIZE - 1] ^= 0x40  # one bit of the last float: same size, valid .npy
    flipped.write_bytes(bytes(data))
    cut = folder / f"{image_digest(x[2])}.npy"
    cut.write_bytes(cut.read_bytes()[:-7])  # a copy cut short
    assert features_module.read_entry(flipped, (4,))[1] == "checksum mismatch"
    capsys.readouterr()
    calls.clear()
    again = cached_features(model, x, KEY, tmp_path, progress=False)
    assert calls == [2] and np.array_equal(again, good)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 damaged entries recomputed" in err[0] and str(folder) in err[0], err
    assert features_module.read_entry(flipped, (4,))[1] is None  # rewritten whole
    calls.clear()
    cached_features(model, x, KEY, tmp_path, progress=False)
    assert calls == [] and capsys.readouterr().err == ""
