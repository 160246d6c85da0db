"""Kernels: environments an image holds beside its own, at <prefix>/envs/<name>, each
registered as a Jupyter kernel of the image's own environment. Pure: kernelspecs as the
Jupyter kernel spec format reads them (jupyter_client's KernelSpec), no I/O.

The kernel's process must see its own environment activated, though the server that
starts it runs in the image's: the kernelspec's `env` sets CONDA_PREFIX and a PATH that
starts with the kernel's bin/, and the environment file's variables. jupyter_client merges
`env` into the server's environment for the kernel it starts.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from condery.image.environment import Kernel
from condery.layers.activation import NO_SCRIPTS, Activation

# The PATH a kernel starts with after its own and the image's bin/: Debian's default.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def kernel_prefix(prefix: str, kernel: Kernel) -> str:
    return f"{prefix}/envs/{kernel.name}"


def kernelspec(kernel: Kernel, prefix: str, activation: Activation = NO_SCRIPTS) -> dict[str, Any] | None:
    """The kernel.json of `kernel` in an image whose own environment is at `prefix`; None for
    an environment with no kernel language (tools only). `activation` is what the kernel
    environment's own activate.d scripts export (layers/activation.py): its process gets it."""
    home = kernel_prefix(prefix, kernel)
    if kernel.language == "python":
        argv = [f"{home}/bin/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    elif kernel.language == "R":
        argv = [f"{home}/bin/R", "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"]
    else:
        return None
    env = {
        **dict(activation.env),
        "CONDA_PREFIX": home,
        "CONDA_DEFAULT_ENV": home,
        "PATH": ":".join([*activation.path_prepend, f"{home}/bin", f"{prefix}/bin", SYSTEM_PATH]),
        **dict(kernel.environment.variables),
    }
    return {
        "argv": argv,
        "display_name": kernel.display_name,
        "language": kernel.language,
        "env": env,
        "metadata": {"condery": {"environment": kernel.environment.id, "prefix": home}},
    }


def kernelspec_files(kernels: Sequence[tuple[Kernel, Activation]], prefix: str) -> dict[str, str]:
    """The kernel.json files of the image's own environment (relative to its prefix)."""
    files = {}
    for kernel, activation in kernels:
        spec = kernelspec(kernel, prefix, activation)
        if spec is not None:
            files[f"share/jupyter/kernels/{kernel.name}/kernel.json"] = json.dumps(spec, indent=1, sort_keys=True) + "\n"
    return files


def kernels_json(kernels: tuple[Kernel, ...], prefix: str) -> list[dict[str, Any]]:
    """What the images API and the image page say of an image's kernels."""
    return [
        {"name": k.name, "display_name": k.display_name, "language": k.language, "prefix": kernel_prefix(prefix, k),
         "environment": k.environment.id, "kernel": k.language is not None}
        for k in kernels
    ]
