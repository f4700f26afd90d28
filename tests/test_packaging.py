"""The kernels folder is installed as `calibatt_kernels`, and diffusers does not mistake it for PyPI's
`kernels` package (which it probes for and would then try to use)."""

import importlib.metadata

import calibatt_kernels


def test_import_name_and_no_kernels_distribution():
    assert calibatt_kernels.__name__ == "calibatt_kernels"
    assert callable(calibatt_kernels.block_sparse_attention)
    names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    assert "calibatt" in names and "kernels" not in names


def test_diffusers_does_not_see_a_kernels_package():
    from diffusers.utils.import_utils import is_kernels_available

    assert not is_kernels_available()
