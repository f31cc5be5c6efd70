"""The FID Inception-v3 in plain torch: the network every published FID number was measured with.

FID (Heusel et al. 2017) is only comparable across papers when the features come from one
exact network: TensorFlow's Inception "2015-12-05" graph, which pytorch-fid ports as
torchvision's InceptionV3 with four patched blocks (FIDInceptionA/C/E_1/E_2): the branch
average pools ignore padded zeros (TF's `count_include_pad=False`), and the last block (Mixed_7c)
max-pools in its pool branch (a quirk of that graph, kept because the weights were trained with
it). torchvision's own ImageNet Inception gives different numbers, and torchvision cannot be
installed beside transformers here, so the network is written out below with torchvision's
module names, which makes pytorch-fid's weight file load key for key.

Weights: pytorch-fid publishes `pt_inception-2015-12-05-6726825d.pth` (a pickle, which sfumato
never loads). Convert it once to safetensors with a torch of your own:

    python -c "import torch, safetensors.torch as st; st.save_file(torch.load(\
        'pt_inception-2015-12-05-6726825d.pth', weights_only=True), 'pt_inception-2015-12-05.safetensors')"

then point `evaluate.inception_weights` at that file, at a folder holding it, or at a hub
repository that holds `pt_inception-2015-12-05.safetensors`.

Input: float NCHW RGB in [-1, 1], any size; resized bilinearly to 299x299 (pytorch-fid's
`resize_input`; it scales [0, 1] to [-1, 1] after resizing, which is the same since both are
linear). Output: the 2048-d pool3 features. The 1008-class head is part of the weight file but
unused.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = "pt_inception-2015-12-05.safetensors"
INPUT_PX = 299
FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **conv):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    # TF's average pool divides by the number of real pixels, not padded zeros.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool_tf(x)),
            ],
            1,
        )


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([self.branch1x1(x), seven, double, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b (average pool branch, TF style) and Mixed_7c (`max_pool=True`: the graph's
    max pool, pytorch-fid's FIDInceptionE_2)."""

    def __init__(self, in_channels: int, max_pool: bool = False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        three = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(three),
                self.branch3x3_2b(three),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(pooled),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """[N, 3, H, W] in [-1, 1] -> [N, 2048] pool3 features. Randomly initialised (He-normal
    convolutions, so activations keep their scale through the depth) until weights are loaded."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, 1008)  # the graph's 1008-class head: in the file, unused
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(INPUT_PX, INPUT_PX), mode="bilinear", align_corners=False)
        x = x.contiguous(memory_format=torch.channels_last)  # oneDNN/cuDNN's fast layout, same values
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def weights_path(source: str | Path) -> Path:
    """The safetensors file a source names: the file itself, `WEIGHTS_FILE` inside a folder, or
    `WEIGHTS_FILE` downloaded from a hub repository id."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"{path} holds no {WEIGHTS_FILE}: convert pytorch-fid's weights "
                "(see sfumato/evaluate/inception.py) and put the file there"
            )
        return path / WEIGHTS_FILE
    looks_like_path = str(source).startswith(("/", ".", "~")) or path.suffix in (".safetensors", ".pth")
    if looks_like_path:
        raise FileNotFoundError(f"FID Inception weights {source} do not exist (evaluate.inception_weights)")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(source), WEIGHTS_FILE))
    except OSError as exc:  # the hub's HTTP and offline-cache errors are OSErrors
        raise FileNotFoundError(
            f"evaluate.inception_weights={source} is not a local file or folder, and "
            f"downloading {WEIGHTS_FILE} from that hub repository failed: {exc}"
        ) from exc


def load_fid_inception(source: str | Path) -> FIDInceptionV3:
    """The FID Inception with the weights of `source` (see `weights_path`), strictly: every
    parameter and running statistic present with its shape, nothing unknown. BatchNorm's
    `num_batches_tracked` counters may be absent (older torch did not save them; eval ignores them)."""
    from safetensors.torch import load_file

    path = weights_path(source)
    state = load_file(str(path))
    model = FIDInceptionV3()
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in expected)
    wrong_shape = sorted(
        f"{k} {tuple(state[k].shape)} (want {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{path} is not pytorch-fid's pt_inception-2015-12-05 state dict: "
            f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}, "
            f"wrong shapes {wrong_shape[:10]}"
        )
    model.load_state_dict({**expected, **state}, strict=True)
    return model.eval()
