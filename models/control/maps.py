"""Control-map preprocessors in plain torch (no OpenCV): Canny-like edges and a soft silhouette.

Both take images ``(B, 3, H, W)`` in 0..1 (ComfyUI's IMAGE is ``(B, H, W, C)``: the nodes permute) and return maps
``(B, 1, H, W)`` in 0..1, deterministic (no randomness, no data-dependent iteration order).

Edges (Canny's steps): luma, Gaussian blur (``sigma``), Sobel gradients normalised so that a 0 -> 1 step has
magnitude 1, non-maximum suppression along the gradient direction quantised to 0/45/90/135 degrees, double
threshold (``low``, ``high`` in those units; OpenCV's usual 100/200 on 8-bit images are about 0.1/0.2), then
hysteresis: weak edges connected (8-neighbourhood) to a strong edge are kept, by repeated 3x3 dilation within
the weak set until nothing changes.

Silhouette: the background colour is the median of the image's border pixels; a pixel's foreground score is its
colour distance ``d`` from it (RMS over RGB), ``sigmoid((d - threshold) / softness)`` rescaled so that ``d = 0``
gives 0, then blurred by ``blur`` pixels. It suits
objects on a plain background (product shots, the pack's synthetic data); use a segmentation pack's mask otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import NextScaleError

LUMA = (0.299, 0.587, 0.114)


def _check(img_B3HW: torch.Tensor) -> torch.Tensor:
    if img_B3HW.dim() != 4 or img_B3HW.shape[1] not in (1, 3, 4):
        raise NextScaleError(f"expected images (batch, 3, height, width), got {list(img_B3HW.shape)}")
    img = img_B3HW.float()
    if img.shape[1] == 1:
        img = img.expand(-1, 3, -1, -1)
    return img[:, :3]


def gaussian_blur(x_BCHW: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with replicate padding (radius ``ceil(3 sigma)``); ``sigma <= 0`` returns ``x``."""
    if sigma <= 0:
        return x_BCHW
    r = max(1, int(torch.tensor(3.0 * sigma).ceil()))
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=x_BCHW.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x_BCHW.dtype)
    C = x_BCHW.shape[1]
    x = F.pad(x_BCHW, (r, r, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    x = F.pad(x, (0, 0, r, r), mode="replicate")
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def canny_edges(img_B3HW: torch.Tensor, low: float = 0.1, high: float = 0.2, sigma: float = 1.0) -> torch.Tensor:
    """Binary Canny-like edges ``(B, 1, H, W)`` (0 or 1); see the module docstring."""
    if not 0 <= low <= high:
        raise NextScaleError(f"edge thresholds need 0 <= low <= high, got low={low}, high={high}")
    img = _check(img_B3HW)
    luma = (img * torch.tensor(LUMA, device=img.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    g = gaussian_blur(luma, sigma)
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=img.device) / 4
    kernels = torch.stack((sobel_x, sobel_x.t()))[:, None]
    gx, gy = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), kernels).unbind(1)
    mag = torch.sqrt(gx * gx + gy * gy)  # (B, H, W)
    # direction bins: 0 = horizontal gradient (compare left/right), 1 = 45 deg, 2 = vertical, 3 = 135 deg
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    bins = (((angle + 22.5) // 45) % 4).long()
    padded = F.pad(mag[:, None], (1, 1, 1, 1))[:, 0]
    H, W = mag.shape[-2:]

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return padded[:, 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]

    # image rows grow downwards, so a gradient at +45 deg (gy > 0, gx > 0) points to (dy, dx) = (1, 1)
    neighbours = [(shifted(0, 1), shifted(0, -1)), (shifted(1, 1), shifted(-1, -1)),
                  (shifted(1, 0), shifted(-1, 0)), (shifted(1, -1), shifted(-1, 1))]
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for b, (n1, n2) in enumerate(neighbours):
        keep |= (bins == b) & (mag > n1) & (mag >= n2)  # ties (a step between two pixels) keep one side
    thin = torch.where(keep, mag, torch.zeros_like(mag))
    strong = (thin >= high) & (thin > 0)
    weak = (thin >= low) & (thin > 0)
    edges = strong.float()[:, None]
    weak_f = weak.float()[:, None]
    for _ in range(H * W):  # hysteresis: grow strong edges through connected weak ones
        grown = F.max_pool2d(edges, 3, stride=1, padding=1) * weak_f
        grown = torch.maximum(grown, edges)
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges


def soft_silhouette(img_B3HW: torch.Tensor, threshold: float = 0.15, softness: float = 0.05,
                    blur: float = 1.0) -> torch.Tensor:
    """Soft foreground mask ``(B, 1, H, W)`` in 0..1 against the border's median colour; see the module docstring."""
    if softness <= 0:
        raise NextScaleError(f"silhouette softness must be positive, got {softness}")
    img = _check(img_B3HW)
    border = torch.cat((img[..., 0, :], img[..., -1, :], img[..., :, 0], img[..., :, -1]), dim=-1)  # (B, 3, n)
    bg_B31 = border.median(dim=-1).values[..., None, None]
    dist = (img - bg_B31).pow(2).sum(1, keepdim=True).div(3).sqrt()
    floor = torch.sigmoid(torch.tensor(-threshold / softness))  # the background colour itself maps to 0
    soft = (torch.sigmoid((dist - threshold) / softness) - floor) / (1 - floor)
    return gaussian_blur(soft, blur).clamp(0, 1)


def map_to_image(map_B1HW: torch.Tensor) -> torch.Tensor:
    """A one-channel map to ComfyUI's IMAGE ``(B, H, W, 3)``."""
    return map_B1HW.float().clamp(0, 1).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous()
