"""The unit every dataset reader produces."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Sample:
    """One test (or auxiliary-training) image.

    ``class_name`` is the prompt class (key of the dataset's description table);
    ``variant`` is the reporting unit (equal to ``class_name`` except for
    DTD-Synthetic, whose 12 texture folders are reported separately).
    """

    image_path: str                 # absolute path
    label: int                      # 0 normal, 1 anomalous
    class_name: str
    mask_path: Optional[str] = None  # absolute path; None for normals and image-level-only data
    dataset: str = "custom"
    variant: Optional[str] = None
    defect_type: Optional[str] = None
    has_pixel_gt: bool = True       # False for datasets without masks (e.g. HeadCT)

    @property
    def group(self) -> str:
        return self.variant or self.class_name
