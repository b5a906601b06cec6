"""The authors' published numbers of the paper's Table 1: the one place they are kept.

Source: the CDM paper's Table 1 as the authors' project page gives it. Protocol there: 1024 px,
the 2,048 Pick-a-Pic test prompts, one image per prompt; the Base row is the teacher at 50
steps with CFG 4.5 (100 NFE), students at 4 steps with guidance 1.0. Columns: Aesthetic
(LAION MLP on CLIP ViT-L/14), DPGBench, PickScore, HPSv3, CLIPScore (their code: OpenAI
CLIP ViT-L/14, 100 x cosine).
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = "the authors' Table 1 (project page)"
METRICS = ("aesthetic", "dpg", "pickscore", "hpsv3", "clip")  # the table's column order


@dataclass(frozen=True)
class Row:
    method: str  # as the paper names it
    nfe: int  # as the paper counts it
    values: tuple[float, float, float, float, float]  # in METRICS order
    model: str | None  # our sample set of the same model (params), None: not run here

    def value(self, metric: str) -> float:
        return self.values[METRICS.index(metric)]


# Our sample sets: teacher_cfg (the teacher at teacher.steps, teacher.cfg_scale), the methods
# of params (dmd2, cdm) and the compare entries of configs/sd3-medium.yaml. D-DMD (Decoupled
# DMD) has no preset here.
TABLE1: dict[str, tuple[Row, ...]] = {
    "sd3": (  # SD3-Medium
        Row("Base", 100, (5.885, 85.04, 21.73, 8.189, 28.60), "teacher_cfg"),
        Row("Hyper-SD", 8, (5.180, 80.43, 20.82, 6.054, 27.93), "hyper_sd"),
        Row("Flash", 4, (5.968, 80.47, 21.69, 8.282, 28.18), "flash_sd3"),
        Row("TDM", 4, (6.013, 83.12, 21.61, 8.468, 27.63), "tdm"),
        Row("DMD2", 4, (6.038, 83.96, 21.58, 8.419, 27.56), "dmd2"),
        Row("D-DMD", 4, (6.038, 84.52, 21.85, 9.176, 27.69), None),
        Row("CDM", 4, (6.075, 85.26, 21.95, 9.561, 27.98), "cdm"),
    ),
    "longcat": (  # LongCat-Image
        Row("Base", 100, (5.926, 87.08, 21.65, 9.450, 26.78), "teacher_cfg"),
        Row("DMD2", 4, (5.800, 87.12, 21.07, 8.803, 26.99), "dmd2"),
        Row("D-DMD", 4, (5.782, 88.04, 21.23, 9.629, 26.57), None),
        Row("CDM", 4, (5.919, 88.35, 21.53, 10.65, 26.72), "cdm"),
    ),
}
MODEL_NAMES = {
    "sd3": "SD3-Medium", "longcat": "LongCat-Image", "qwen-image": "Qwen-Image",
    "flux2-klein": "FLUX.2 [klein] base",
}  # fmt: skip
