"""The tasks that SAM-family methods are compared on: data sets (`DATASETS`, train/test `ImageSource`s
that `samsuite train` decodes to tensors and fedsam partitions), label noise, domain suites
(`SUITES`) with the leave-one-domain-out protocol, the model registry (`MODELS`), and USEFUL's
change of the training distribution (`useful_plan`).

Names are re-exported lazily (PEP 562), so `import testbeds.models` stays cheap and does not pull in
`datasets` or the MNIST-1D generator until a data name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "sources": ("DATASETS", "ImageSource", "decode_images", "label_column", "load_source", "random_crop_flip",
                "source_tensors"),
    "mnist1d": ("MNIST1D_DEFAULTS", "generate_mnist1d", "mnist1d_args", "mnist1d_source"),
    "noise": ("NOISE_KINDS", "noisy_labels", "with_label_noise"),
    "domains": ("SUITES", "DomainSuite", "load_suite", "rotate", "suite_tensors"),
    "protocol": ("DomainSplit", "FineTuneSplit", "fine_tune_split", "leave_one_domain_out", "lodo_table",
                 "select_by_validation"),
    "models": ("MODELS", "build_model"),
    "useful": ("UsefulPlan", "useful_plan"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [  # noqa: RUF022 - grouped by module, as _EXPORTS
    "DATASETS", "ImageSource", "decode_images", "label_column", "load_source", "random_crop_flip", "source_tensors",
    "MNIST1D_DEFAULTS", "generate_mnist1d", "mnist1d_args", "mnist1d_source",
    "NOISE_KINDS", "noisy_labels", "with_label_noise",
    "SUITES", "DomainSuite", "load_suite", "rotate", "suite_tensors",
    "DomainSplit", "FineTuneSplit", "fine_tune_split", "leave_one_domain_out", "lodo_table", "select_by_validation",
    "MODELS", "build_model",
    "UsefulPlan", "useful_plan",
]

if TYPE_CHECKING:
    from testbeds.domains import SUITES, DomainSuite, load_suite, rotate, suite_tensors
    from testbeds.mnist1d import MNIST1D_DEFAULTS, generate_mnist1d, mnist1d_args, mnist1d_source
    from testbeds.models import MODELS, build_model
    from testbeds.noise import NOISE_KINDS, noisy_labels, with_label_noise
    from testbeds.protocol import (
        DomainSplit,
        FineTuneSplit,
        fine_tune_split,
        leave_one_domain_out,
        lodo_table,
        select_by_validation,
    )
    from testbeds.sources import (
        DATASETS,
        ImageSource,
        decode_images,
        label_column,
        load_source,
        random_crop_flip,
        source_tensors,
    )
    from testbeds.useful import UsefulPlan, useful_plan


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'testbeds' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"testbeds.{_WHERE[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
