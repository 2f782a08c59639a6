"""Downloads and decoding of raw datasets, without internet.

Fake files in the official formats are served by a real HTTP server on
127.0.0.1 (or a file:// folder), and torchvision's expected MD5s are patched,
in this process only, to the MD5s of those files.
"""

from __future__ import annotations

import tarfile
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, MNIST, FashionMNIST

from helpers.archives import CIFAR_CLASSES, FakeDataset, cifar10_archive, file_info, md5, mnist_files, tar_gz
from pipeline.datasets import downloads, folders, official
from pipeline.errors import UserError

MNIST_FILES = [filename for filename, _ in MNIST.resources]


# ---------------------------------------------------------------- a local mirror

class Mirror:
    """What the local server serves: `files` by name, with scripted misbehaviour per name, counting requests.

    A script step is an HTTP status to answer with, "truncate" (announce the
    full length, send half, close) or "nolength" (send half without a length).
    """

    def __init__(self, url: str):
        self.url = url
        self.files: dict[str, bytes] = {}
        self.script: dict[str, list] = {}
        self.requests: Counter[str] = Counter()


class MirrorHandler(BaseHTTPRequestHandler):
    timeout = 5  # a stuck client can't hold a server thread for long

    def do_GET(self):
        mirror: Mirror = self.server.mirror
        name = self.path.lstrip("/")
        mirror.requests[name] += 1
        steps = mirror.script.get(name)
        step = steps.pop(0) if steps else "ok"
        blob = mirror.files.get(name)
        if isinstance(step, int) or blob is None:
            self.send_error(step if isinstance(step, int) else 404)
            return
        body = blob if step == "ok" else blob[:len(blob) // 2]
        self.send_response(200)
        if step != "nolength":
            self.send_header("Content-Length", str(len(blob)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror():
    server = ThreadingHTTPServer(("127.0.0.1", 0), MirrorHandler)
    server.mirror = Mirror(f"http://127.0.0.1:{server.server_port}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.mirror
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(downloads, "BACKOFF_S", 0.01)
    monkeypatch.setattr(downloads, "TIMEOUT_S", 5.0)


@pytest.fixture(scope="module")
def fake_mnist() -> FakeDataset:
    return mnist_files(n_train=60, n_test=20)


@pytest.fixture(scope="module")
def fake_cifar() -> FakeDataset:
    return cifar10_archive(per_batch=6, n_test=10)


def publish_idx(monkeypatch, mirror: Mirror, dataset_class: type, fake: FakeDataset) -> None:
    mirror.files.update(fake.files)
    monkeypatch.setattr(dataset_class, "resources", [(name, fake.md5(name)) for name, _ in dataset_class.resources])


def publish_cifar(monkeypatch, mirror: Mirror, fake: FakeDataset) -> None:
    mirror.files.update(fake.files)
    monkeypatch.setattr(CIFAR10, "tgz_md5", fake.md5(CIFAR10.filename))
    monkeypatch.setattr(CIFAR10, "train_list", [[name, md5(fake.members[name])] for name, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5(fake.members["test_batch"])]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(fake.members["batches.meta"])})


def publish_archive(monkeypatch, mirror: Mirror, archive: bytes) -> None:
    mirror.files[CIFAR10.filename] = archive
    monkeypatch.setattr(CIFAR10, "tgz_md5", md5(archive))


def assert_one_line_error(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


# ---------------------------------------------------------------- download + load_raw

@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_download_and_load_round_trip(name, mirror, fake_mnist, fake_cifar, monkeypatch, tmp_path):
    if name == "cifar10":
        fake, classes, shape = fake_cifar, CIFAR_CLASSES, (3, 32, 32)
        publish_cifar(monkeypatch, mirror, fake)
    else:
        dataset_class = MNIST if name == "mnist" else FashionMNIST
        fake, classes, shape = fake_mnist, dataset_class.classes, (1, 28, 28)
        publish_idx(monkeypatch, mirror, dataset_class, fake)
    root = tmp_path / "raw" / name

    paths = official.download(name, root, mirror=mirror.url)
    assert all(path.exists() and path.parent == root for path in paths)
    raw = official.load_raw(name, root)

    assert raw.train_images.dtype == torch.uint8 and raw.train_images.shape == (len(fake.train_labels), *shape)
    assert raw.test_images.dtype == torch.uint8 and raw.test_images.shape == (len(fake.test_labels), *shape)
    assert raw.train_labels.dtype == raw.test_labels.dtype == torch.int64
    assert torch.equal(raw.train_images, fake.train_images) and torch.equal(raw.train_labels, fake.train_labels)
    assert torch.equal(raw.test_images, fake.test_images) and torch.equal(raw.test_labels, fake.test_labels)
    assert raw.classes == list(classes)
    assert not [path for path in files_under(root) if path.endswith(".part")]


def test_file_mirror(fake_mnist, monkeypatch, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    for name, blob in fake_mnist.files.items():
        (served / name).write_bytes(blob)
    monkeypatch.setattr(MNIST, "resources", [(name, fake_mnist.md5(name)) for name in MNIST_FILES])

    official.download("mnist", tmp_path / "raw", mirror=served.as_uri() + "/")
    assert torch.equal(official.load_raw("mnist", tmp_path / "raw").train_images, fake_mnist.train_images)


def test_torchvision_mirrors_are_tried_in_order(mirror, fake_mnist, monkeypatch, tmp_path):
    publish_idx(monkeypatch, mirror, MNIST, fake_mnist)
    monkeypatch.setattr(MNIST, "mirrors", [f"{mirror.url}/gone/", f"{mirror.url}/"])

    official.download("mnist", tmp_path, retries=3)
    for name in MNIST_FILES:
        assert mirror.requests[f"gone/{name}"] == 1  # a 404 is not retried: the next mirror is
        assert mirror.requests[name] == 1


def test_wrong_bytes_are_never_kept_and_the_error_says_what_to_do(mirror, fake_mnist, monkeypatch, tmp_path):
    publish_idx(monkeypatch, mirror, MNIST, fake_mnist)
    name = MNIST_FILES[0]
    mirror.files[name] = b"<html>a captive portal</html>"

    with pytest.raises(UserError) as error:
        official.download("mnist", tmp_path, mirror=mirror.url)
    assert_one_line_error(error, name, fake_mnist.md5(name), md5(mirror.files[name]), f"{mirror.url}/{name}",
                          "place the uncompressed file in", f"data.checksums.{name}")
    assert files_under(tmp_path) == []  # neither the final name nor a temporary file a later run could take

    mirror.files[name] = fake_mnist.files[name]
    official.download("mnist", tmp_path, mirror=mirror.url)
    assert mirror.requests[name] == 2


def test_truncated_download_is_retried_then_refused(mirror, fake_mnist, monkeypatch, tmp_path):
    publish_idx(monkeypatch, mirror, MNIST, fake_mnist)
    name = MNIST_FILES[0]
    mirror.script[name] = ["truncate"] * 10

    with pytest.raises(UserError) as error:
        official.download("mnist", tmp_path, mirror=mirror.url, retries=2)
    assert_one_line_error(error, f"{mirror.url}/{name}", "closed after", "after 3 attempts")
    assert mirror.requests[name] == 3
    assert files_under(tmp_path) == []


def test_truncated_download_succeeds_on_retry(mirror, fake_mnist, monkeypatch, tmp_path):
    publish_idx(monkeypatch, mirror, MNIST, fake_mnist)
    mirror.script[MNIST_FILES[0]] = ["truncate"]

    official.download("mnist", tmp_path, mirror=mirror.url)
    assert mirror.requests[MNIST_FILES[0]] == 2
    assert torch.equal(official.load_raw("mnist", tmp_path).train_images, fake_mnist.train_images)


def test_truncation_without_a_length_is_caught_by_the_md5(mirror, fake_mnist, monkeypatch, tmp_path):
    publish_idx(monkeypatch, mirror, MNIST, fake_mnist)
    name = MNIST_FILES[0]
    mirror.script[name] = ["nolength"]

    with pytest.raises(UserError) as error:
        official.download("mnist", tmp_path, mirror=mirror.url)
    assert_one_line_error(error, "MD5 mismatch", name, fake_mnist.md5(name))
    assert files_under(tmp_path) == []


def test_server_errors_are_retried(mirror, fake_mnist, monkeypatch, tmp_path):
    publish_idx(monkeypatch, mirror, MNIST, fake_mnist)
    mirror.script[MNIST_FILES[1]] = [500, 503]

    official.download("mnist", tmp_path, mirror=mirror.url, retries=3)
    assert mirror.requests[MNIST_FILES[1]] == 3


def test_persistent_server_errors_give_up(mirror, fake_mnist, monkeypatch, tmp_path):
    publish_idx(monkeypatch, mirror, MNIST, fake_mnist)
    name = MNIST_FILES[0]
    mirror.script[name] = [500] * 10

    with pytest.raises(UserError) as error:
        official.download("mnist", tmp_path, mirror=mirror.url, retries=2)
    assert_one_line_error(error, f"{mirror.url}/{name}", "500", "after 3 attempts")
    assert mirror.requests[name] == 3


def test_not_found_is_not_retried(mirror, fake_mnist, monkeypatch, tmp_path):
    publish_idx(monkeypatch, mirror, MNIST, fake_mnist)
    name = MNIST_FILES[0]
    del mirror.files[name]

    with pytest.raises(UserError) as error:
        official.download("mnist", tmp_path, mirror=mirror.url, retries=5)
    assert_one_line_error(error, f"{mirror.url}/{name}", "404")
    assert mirror.requests[name] == 1
    assert files_under(tmp_path) == []


def test_verified_files_are_not_fetched_again_and_bad_ones_are_set_aside(mirror, fake_mnist, monkeypatch, tmp_path,
                                                                        capsys):
    publish_idx(monkeypatch, mirror, MNIST, fake_mnist)
    official.download("mnist", tmp_path, mirror=mirror.url)
    official.download("mnist", tmp_path, mirror=mirror.url)
    assert all(mirror.requests[name] == 1 for name in MNIST_FILES)
    assert {path.stat().st_mode & 0o777 for path in tmp_path.iterdir()} == {0o644}  # readable by a shared cache

    bad = tmp_path / MNIST_FILES[2]
    bad.write_bytes(b"partial")
    official.download("mnist", tmp_path, mirror=mirror.url)
    assert [mirror.requests[name] for name in MNIST_FILES] == [1, 1, 2, 1]
    assert bad.read_bytes() == fake_mnist.files[MNIST_FILES[2]]
    aside = tmp_path / f"{bad.name}.rejected-{md5(b'partial')[:8]}"  # the user's file, kept and named
    assert aside.read_bytes() == b"partial" and f"moved aside to {aside}" in capsys.readouterr().err


def test_load_raw_refuses_files_that_are_not_the_official_ones(mirror, fake_mnist, monkeypatch, tmp_path):
    publish_idx(monkeypatch, mirror, MNIST, fake_mnist)
    with pytest.raises(UserError) as error:
        official.load_raw("mnist", tmp_path)
    assert_one_line_error(error, "missing", MNIST_FILES[0])

    official.download("mnist", tmp_path, mirror=mirror.url)
    (tmp_path / MNIST_FILES[1]).write_bytes(b"tampered")
    with pytest.raises(UserError) as error:
        official.load_raw("mnist", tmp_path)
    assert_one_line_error(error, "MD5 mismatch", MNIST_FILES[1])


def test_tampered_cifar_batch_is_never_unpickled_and_download_repairs_it(mirror, fake_cifar, monkeypatch, tmp_path):
    publish_cifar(monkeypatch, mirror, fake_cifar)
    official.download("cifar10", tmp_path, mirror=mirror.url)
    batch = tmp_path / CIFAR10.base_folder / "data_batch_3"
    batch.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")  # a pickle that would run a shell command

    with pytest.raises(UserError) as error:
        official.load_raw("cifar10", tmp_path)
    assert_one_line_error(error, "MD5 mismatch", str(batch))

    official.download("cifar10", tmp_path, mirror=mirror.url)
    assert mirror.requests[CIFAR10.filename] == 1  # re-extracted from the verified archive, not fetched again
    assert torch.equal(official.load_raw("cifar10", tmp_path).train_images, fake_cifar.train_images)


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown dataset"):
        official.download("imagenet", tmp_path)
    with pytest.raises(UserError, match="mirror"):
        official.download("mnist", tmp_path, mirror="ftp://example.com/mnist")
    with pytest.raises(UserError, match="unknown dataset"):
        official.load_raw("svhn", tmp_path)


# ---------------------------------------------------------------- hostile archives

def hostile_archive(member: tarfile.TarInfo, blob: bytes | None = None) -> bytes:
    good = b"fine"
    return tar_gz([(file_info("cifar-10-batches-py/data_batch_1", len(good)), good), (member, blob)])


def hostile_members(outside: Path) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    evil = b"evil"
    return {
        "dotdot": (file_info("cifar-10-batches-py/../../evil", len(evil)), evil),
        "absolute": (file_info(str(outside / "evil"), len(evil)), evil),
        "symlink": (file_info("cifar-10-batches-py/link", kind=tarfile.SYMTYPE, linkname=str(outside)), None),
        "hardlink": (file_info("cifar-10-batches-py/hard", kind=tarfile.LNKTYPE, linkname="/etc/passwd"), None),
        "device": (file_info("cifar-10-batches-py/dev", kind=tarfile.CHRTYPE), None),
    }


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device"])
def test_hostile_tar_members_are_refused(kind, mirror, monkeypatch, tmp_path):
    outside, root = tmp_path / "outside", tmp_path / "work" / "raw"
    member, blob = hostile_members(outside)[kind]
    publish_archive(monkeypatch, mirror, hostile_archive(member, blob))

    with pytest.raises(UserError) as error:
        official.download("cifar10", root, mirror=mirror.url)
    assert_one_line_error(error, repr(member.name), "refusing")
    assert files_under(tmp_path) == ["work", "work/raw", f"work/raw/{CIFAR10.filename}"]


def test_broken_archive_leaves_no_folder(mirror, fake_cifar, monkeypatch, tmp_path):
    archive = fake_cifar.files[CIFAR10.filename]
    publish_archive(monkeypatch, mirror, archive[:len(archive) // 2])  # "official" MD5, yet a cut-off gzip stream

    with pytest.raises(UserError) as error:
        official.download("cifar10", tmp_path, mirror=mirror.url)
    assert_one_line_error(error, "cannot extract", CIFAR10.filename)
    assert files_under(tmp_path) == [CIFAR10.filename]


# ---------------------------------------------------------------- image folders

def save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def palette_image(size: tuple[int, int]) -> Image.Image:
    image = Image.new("P", size)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    image.paste(1, (0, 0, size[0] // 2, size[1]))
    return image


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    noise = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    save(Image.new("L", (20, 30), 90), folder / "dog" / "grey.png")
    save(Image.fromarray(noise), folder / "dog" / "photo.jpg")
    save(Image.new("RGBA", (10, 10), (255, 0, 0, 128)), folder / "dog" / "nested" / "alpha.png")
    save(palette_image((64, 64)), folder / "cat" / "palette.png")
    save(Image.new("RGB", (16, 16), (0, 128, 255)), folder / "cat" / "exact.png")
    save(Image.new("L", (100, 7), 200), folder / "cat" / "wide.jpeg")
    (folder / "cat" / "notes.txt").write_text("not an image")
    (folder / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "README.md").write_text("a file next to the class folders")
    return folder


@pytest.mark.parametrize("channels", [1, 3])
def test_load_folder_decodes_mixed_images(channels, image_folder):
    raw = folders.load_folder(image_folder, channels=channels, image_size=16, skip_bad_images=False)

    assert raw.classes == ["cat", "dog"]
    assert raw.train_images.dtype == torch.uint8 and raw.train_images.shape == (6, channels, 16, 16)
    assert raw.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert raw.test_images is None and raw.test_labels is None
    # the same conversion as a single image at predict time, in the same (sorted) order
    files = ["cat/exact.png", "cat/palette.png", "cat/wide.jpeg", "dog/grey.png", "dog/nested/alpha.png",
             "dog/photo.jpg"]
    for image, name in zip(raw.train_images, files):
        assert torch.equal(image, folders.load_image(image_folder / name, channels, 16))


def test_load_image_converts_modes_through_rgb(image_folder):
    alpha = folders.load_image(image_folder / "dog" / "nested" / "alpha.png", 3, 4)
    assert alpha[:, 0, 0].tolist() == [255, 0, 0]  # alpha dropped, colour kept
    palette = folders.load_image(image_folder / "cat" / "palette.png", 1, 64)
    assert palette[0, 0, 0] == 29 and palette[0, 0, -1] == 76  # blue and red as luminance, not palette indices
    grey = folders.load_image(image_folder / "dog" / "grey.png", 3, 8)
    assert grey.shape == (3, 8, 8) and (grey == 90).all()


def test_load_image_scales_16_bit_greys(tmp_path):
    path = save(Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)), tmp_path / "deep.png")
    assert (folders.load_image(path, 1, 4) == 40000 >> 8).all()


def test_corrupt_image_is_an_error_naming_it(image_folder):
    bad = image_folder / "dog" / "broken.png"
    bad.write_bytes((image_folder / "cat" / "palette.png").read_bytes()[:60])
    with pytest.raises(UserError) as error:
        folders.load_folder(image_folder, channels=3, image_size=16, skip_bad_images=False)
    assert_one_line_error(error, str(bad))


def test_corrupt_images_can_be_skipped(image_folder, capsys):
    (image_folder / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    raw = folders.load_folder(image_folder, channels=3, image_size=16, skip_bad_images=True)
    assert raw.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert "skipped 1 unreadable image" in capsys.readouterr().err


def test_a_class_with_only_unreadable_images_is_an_error(image_folder):
    (image_folder / "bird").mkdir()
    (image_folder / "bird" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError) as error:
        folders.load_folder(image_folder, channels=3, image_size=16, skip_bad_images=True)
    assert_one_line_error(error, str(image_folder / "bird"), "no readable images")


def test_empty_class_folder_is_an_error(image_folder):
    (image_folder / "bird").mkdir()
    (image_folder / "bird" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError) as error:
        folders.load_folder(image_folder, channels=3, image_size=16, skip_bad_images=False)
    assert_one_line_error(error, str(image_folder / "bird"), "no images")


def test_fewer_than_two_classes_or_no_folder_is_an_error(tmp_path):
    save(Image.new("L", (8, 8)), tmp_path / "images" / "only" / "a.png")
    with pytest.raises(UserError, match="at least 2 class"):
        folders.load_folder(tmp_path / "images", channels=1, image_size=8, skip_bad_images=False)
    with pytest.raises(UserError, match="not found"):
        folders.load_folder(tmp_path / "missing", channels=1, image_size=8, skip_bad_images=False)


def test_load_image_names_missing_and_non_image_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for path in (text, tmp_path / "missing.png"):
        with pytest.raises(UserError) as error:
            folders.load_image(path, 3, 16)
        assert_one_line_error(error, str(path))
    with pytest.raises(UserError, match="channels"):
        folders.load_image(text, 2, 16)


def test_load_image_applies_exif_rotation(tmp_path):
    image = Image.new("L", (40, 20), 255)
    image.paste(0, (0, 0, 20, 20))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown rotated 90 degrees clockwise, so the left half is on top
    image.save(tmp_path / "phone.jpg", exif=exif)

    shown = folders.load_image(tmp_path / "phone.jpg", 1, 20)[0].float()
    assert shown[:8].mean() < 30 and shown[-8:].mean() > 225


# ---------------------------------------------------------------- the DVC stages on top

def stage_config(**data):
    from pipeline.config import load_config
    from helpers import REPO

    overrides = [f"data.{key}={value}" for key, value in data.items()]
    return load_config(REPO / "params.yaml", [*overrides, "train.epochs=1", "tracking.enabled=false",
                                              "train.device=cpu"])


def test_mnist_download_prepare_train_through_the_stages(monkeypatch, tmp_path, mirror, fake_mnist):
    from pipeline.stages.download import download
    from pipeline.stages.prepare import prepare
    from pipeline.stages.train import train

    publish_idx(monkeypatch, mirror, MNIST, fake_mnist)
    monkeypatch.chdir(tmp_path)
    cfg = stage_config(name="mnist", mirror=mirror.url, val_fraction=0.2)
    download(cfg)
    prepare(cfg)
    prepared = __import__("pipeline.data", fromlist=["load_prepared"]).load_prepared(tmp_path / "data/prepared")
    assert (len(prepared.train), len(prepared.val), len(prepared.test)) == (48, 12, 20)  # official test kept
    assert prepared.input_shape == (1, 28, 28) and prepared.classes == MNIST.classes
    assert torch.equal(prepared.test.labels, fake_mnist.test_labels)
    assert (tmp_path / "reports/data/samples.png").stat().st_size > 1000
    train(cfg.with_overrides({"model.name": "mlp"}), "mlp")
    assert (tmp_path / "models/mlp/model.pt").exists()
    assert sum(mirror.requests.values()) == 4
    download(cfg)  # verified files stay; nothing fetched again
    assert sum(mirror.requests.values()) == 4


def test_cifar10_prepare_keeps_colour_and_official_test_split(monkeypatch, tmp_path, mirror, fake_cifar):
    from pipeline import data
    from pipeline.stages.download import download
    from pipeline.stages.prepare import prepare

    publish_cifar(monkeypatch, mirror, fake_cifar)
    monkeypatch.chdir(tmp_path)
    cfg = stage_config(name="cifar10", mirror=mirror.url, val_fraction=0.2)
    download(cfg)
    prepare(cfg)
    prepared = data.load_prepared(tmp_path / "data/prepared")
    assert prepared.input_shape == (3, 32, 32) and len(prepared.test) == 10 and len(prepared.mean) == 3
    assert prepared.classes == CIFAR_CLASSES


def test_cli_download_of_wrong_bytes_is_one_line_and_leaves_nothing_usable(tmp_path, mirror):
    from helpers import run_cli

    for name in MNIST_FILES:  # the real MD5s apply in the CLI process: these bytes can't match them
        mirror.files[name] = b"not the MNIST you are looking for"
    result = run_cli("download", "--params", str(Path(__file__).parents[1] / "params.yaml"),
                     "--set", "data.name=mnist", "--set", f"data.mirror={mirror.url}", cwd=tmp_path)
    assert result.returncode == 2
    line, = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "train-images-idx3-ubyte.gz" in line and "md5" in line.lower() and mirror.url in line
    assert result.stderr.strip().splitlines()[-1] == line
    raw = tmp_path / "data/raw/mnist"
    assert not raw.exists() or not any(raw.iterdir())


def test_folder_dataset_needs_a_path():
    with pytest.raises(UserError, match="data.path is required when data.name is folder"):
        stage_config(name="folder")


# ---------------------------------------------------------------- local copies

def plain_mnist(fake: FakeDataset) -> dict[str, bytes]:
    """The uncompressed form of each IDX file, as many mirrors and colleagues hand them out."""
    import gzip

    return {name.removesuffix(".gz"): gzip.decompress(blob) for name, blob in fake.files.items()}


@pytest.fixture
def offline_mnist(monkeypatch, mirror, fake_mnist):
    """MNIST with the fake files' MD5s as the official ones (both forms); any network access is counted."""
    publish_idx(monkeypatch, mirror, MNIST, fake_mnist)
    mirror.files.clear()
    monkeypatch.setattr(MNIST, "mirrors", [f"{mirror.url}/"])
    plain = plain_mnist(fake_mnist)
    monkeypatch.setitem(official.UNCOMPRESSED_MD5, "mnist", {name: md5(blob) for name, blob in plain.items()})
    return plain


@pytest.mark.parametrize("layout", ["ours", "torchvision beside", "data.path flat", "data.path torchvision",
                                    "own flat", "own torchvision"])
def test_uncompressed_local_copies_are_used_without_any_network_access(layout, offline_mnist, fake_mnist, mirror,
                                                                        tmp_path):
    root = tmp_path / "data" / "raw" / "mnist"
    local = tmp_path / "elsewhere" if layout.startswith("data.path") else None
    own = tmp_path / "data" / "local" / "mnist"
    folder = {"ours": root, "torchvision beside": tmp_path / "data" / "raw" / "MNIST" / "raw",
              "data.path flat": local, "data.path torchvision": local and local / "MNIST" / "raw",
              "own flat": own, "own torchvision": own.parent / "MNIST" / "raw"}[layout]
    folder.mkdir(parents=True)
    for index, (name, blob) in enumerate(offline_mnist.items()):
        if index == 0 and layout != "ours":  # compressed and uncompressed files mixed
            (folder / f"{name}.gz").write_bytes(fake_mnist.files[f"{name}.gz"])
        else:
            (folder / name).write_bytes(blob)
    before = {path: path.read_bytes() for path in folder.iterdir()}

    official.download("mnist", root, local=local, own=own)
    raw = official.load_raw("mnist", root)

    assert sum(mirror.requests.values()) == 0
    assert torch.equal(raw.train_images, fake_mnist.train_images)
    assert torch.equal(raw.test_labels, fake_mnist.test_labels)
    assert {path: path.read_bytes() for path in folder.iterdir()} == before  # the user's copy is untouched


def test_a_bad_local_copy_is_named_with_what_to_do_and_left_alone(offline_mnist, mirror, tmp_path):
    local = tmp_path / "copy"
    local.mkdir()
    for name, blob in offline_mnist.items():
        (local / name).write_bytes(blob)
    bad = local / "train-labels-idx1-ubyte"
    bad.write_bytes(b"not the labels")

    with pytest.raises(UserError) as error:
        official.download("mnist", tmp_path / "raw", local=local)
    assert_one_line_error(error, str(bad), md5(b"not the labels"), "data.checksums.train-labels-idx1-ubyte=")
    assert bad.read_bytes() == b"not the labels" and sum(mirror.requests.values()) == 0


def test_private_copies_need_the_users_checksums(offline_mnist, fake_mnist, monkeypatch, mirror, tmp_path):
    # Fashion-MNIST publishes no MD5s of its uncompressed files: they are accepted with the user's own only.
    monkeypatch.setattr(FashionMNIST, "resources", MNIST.resources)
    monkeypatch.setattr(FashionMNIST, "mirrors", MNIST.mirrors)
    local = tmp_path / "copy"
    local.mkdir()
    for name, blob in offline_mnist.items():
        (local / name).write_bytes(blob)

    with pytest.raises(UserError) as error:
        official.download("fashion_mnist", tmp_path / "raw", local=local)
    assert_one_line_error(error, "no published MD5", "data.checksums.")

    checksums = {name: md5(blob) for name, blob in offline_mnist.items()}
    official.download("fashion_mnist", tmp_path / "raw", checksums=checksums, local=local)
    raw = official.load_raw("fashion_mnist", tmp_path / "raw", checksums)
    assert torch.equal(raw.train_images, fake_mnist.train_images) and sum(mirror.requests.values()) == 0
    with pytest.raises(UserError, match="MD5 mismatch"):  # prepare verifies against the same accepted MD5s
        official.load_raw("fashion_mnist", tmp_path / "raw")


def test_an_extracted_cifar_copy_needs_no_archive(mirror, fake_cifar, monkeypatch, tmp_path):
    publish_cifar(monkeypatch, mirror, fake_cifar)
    mirror.files.clear()
    local = tmp_path / "copy" / CIFAR10.base_folder
    local.mkdir(parents=True)
    for name, blob in fake_cifar.members.items():
        (local / name).write_bytes(blob)

    official.download("cifar10", tmp_path / "raw", mirror=mirror.url, local=tmp_path / "copy")
    assert torch.equal(official.load_raw("cifar10", tmp_path / "raw").train_images, fake_cifar.train_images)
    assert sum(mirror.requests.values()) == 0


# ---------------------------------------------------------------- the user's copies survive every DVC route

@pytest.mark.slow
def test_own_copies_in_data_local_survive_dvc_exp_run_in_the_workspace_and_in_a_temporary_copy(tmp_path):
    """DVC empties a stage's output folder (data/raw/<name>/) before the stage runs: copies a user put there were
    gone before `download` looked. data/local/<name>/ belongs to no stage, and a queued or temporary experiment,
    which runs in a copy of the repo, still finds it in the user's repository."""
    from helpers import copy_repo, edit_params, git, run_dvc

    repo = copy_repo(tmp_path / "repo")
    fake = mnist_files()
    own = repo / "data" / "local" / "mnist"
    own.mkdir(parents=True)
    for name, blob in fake.files.items():
        (own / name).write_bytes(blob)
    # the fake files' MD5s are the user's trusted ones; a port nobody serves makes any network use fail at once
    edit_params(repo, {"data.checksums": {name: md5(blob) for name, blob in fake.files.items()},
                       "data.mirror": "http://127.0.0.1:9/", "data.retries": 0})
    git(repo, "commit", "-qam", "private copies")
    assert git(repo, "status", "--porcelain").stdout == ""  # data/local/ is git-ignored: the user's, not git's

    for how in (["--temp"], []):  # a temporary copy (as --queue runs), then the workspace
        result = run_dvc("exp", "run", *how, "download", "-S", "data.name=mnist", cwd=repo)
        assert result.returncode == 0, result.stdout + result.stderr
        assert {path.name: path.read_bytes() for path in own.iterdir()} == fake.files  # untouched
    raw = repo / "data" / "raw" / "mnist"
    assert {path.name: path.read_bytes() for path in raw.iterdir()} == fake.files
