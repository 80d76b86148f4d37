"""The datasets ``prep`` knows: file names, known checksums, public mirrors, class names."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass(frozen=True)
class DataFile:
    role: str  # one of ROLES
    name: str  # file name as distributed (gzipped IDX)
    sha256: tuple[str, ...]  # accepted SHA-256 digests of the file as stored (official archive, known repacks)
    content_sha256: str | None  # SHA-256 of the decompressed IDX bytes, independent of gzip settings


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # value of the --dataset flag
    files: tuple[DataFile, ...]  # the four IDX files, in ROLES order
    mirrors: tuple[str, ...]  # base URLs tried in order; a file's URL is base + file name
    system_dirs: tuple[str, ...]  # read-only folders where OS packages install the files
    class_names: tuple[str, ...]  # label index -> readable name
    expected_counts: tuple[int, int] | None  # (train, test) sizes when the dataset is the official one

    def file(self, role: str) -> DataFile:
        return next(f for f in self.files if f.role == role)


MNIST = DatasetSpec(
    name="mnist",
    # SHA-256 of the official archives, as published by TensorFlow Datasets and torchvision.
    files=(
        DataFile("train_images", "train-images-idx3-ubyte.gz",
                 ("440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",), None),
        DataFile("train_labels", "train-labels-idx1-ubyte.gz",
                 ("3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",), None),
        DataFile("test_images", "t10k-images-idx3-ubyte.gz",
                 ("8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",), None),
        DataFile("test_labels", "t10k-labels-idx1-ubyte.gz",
                 ("f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",), None),
    ),
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "https://yann.lecun.com/exdb/mnist/",
    ),
    system_dirs=("/usr/share/datasets/mnist",),
    class_names=tuple(str(d) for d in range(10)),
    expected_counts=(60000, 10000),
)

FASHION_MNIST = DatasetSpec(
    name="fashion_mnist",
    # First digest: Zalando's official archive. Second: Debian's dataset-fashion-mnist
    # (0.0~git20200523.55506a9-1), which recompresses the same IDX bytes. The content digest is
    # what both decompress to.
    files=(
        DataFile("train_images", "train-images-idx3-ubyte.gz",
                 ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                  "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
                 "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        DataFile("train_labels", "train-labels-idx1-ubyte.gz",
                 ("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                  "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
                 "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        DataFile("test_images", "t10k-images-idx3-ubyte.gz",
                 ("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                  "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
                 "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        DataFile("test_labels", "t10k-labels-idx1-ubyte.gz",
                 ("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                  "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
                 "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    ),
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    expected_counts=(60000, 10000),
)


def custom(num_classes: int = 10) -> DatasetSpec:
    """Any folder of the four IDX files under the usual names; no known checksums."""
    return DatasetSpec(
        name="custom",
        files=tuple(DataFile(f.role, f.name, (), None) for f in MNIST.files),
        mirrors=(),
        system_dirs=(),
        class_names=tuple(str(d) for d in range(num_classes)),
        expected_counts=None,
    )


KNOWN = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}
DATASET_NAMES = (*KNOWN, "custom")
