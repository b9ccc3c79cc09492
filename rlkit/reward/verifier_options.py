"""Verifier options, checked against the verifier's signature before any item is scored.

Options arrive from configs and from HTTP requests as JSON values; each is checked against the
annotation of the parameter that receives it (rlkit.option_types), so a wrong type fails naming the
option and the fix.
"""
from __future__ import annotations

import inspect
from typing import Callable

from rlkit.option_types import check_option_types


def check_options(verifier: str, fn: Callable, options: dict) -> None:
    """Raise TypeError unless ``fn`` takes every option in ``options`` with a value of its declared type.

    An option's type is the annotation of the parameter that receives it (the checked types: rlkit.option_types);
    each message names the option, the type given and the type expected, in the ``key: problem. Fix: ...`` form.
    """
    try:
        inspect.signature(fn).bind("response", "reference", **options)
    except TypeError as err:
        raise TypeError(
            f"verifier {verifier!r} cannot take options {sorted(options)}: {err}. "
            f"Fix: use only the options of its signature {fn.__name__}{inspect.signature(fn)}"
        ) from err
    check_option_types(fn, options, f"verifier {verifier!r}")
