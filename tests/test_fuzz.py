"""The bundle and cache loaders under mutated files (bench/fuzz_loaders.py; the full run there is
`--count 10000`): every case loads or ends in calibatt's own one-line error, none raises anything else or
hangs. A fixed seed keeps the cases the same from run to run."""

import fuzz_loaders


def test_loaders_survive_mutated_files():
    res = fuzz_loaders.fuzz(count=240, seed=0)
    assert res["failures"] == [], res["failures"][:5]
    assert res["cases"] == 240
    # the cases reach every loader and most end in a refusal (a test of the fuzzer: mutations that mostly
    # load would test nothing)
    targets = {name.split("/")[0] for name in res["by_mutation"]}
    assert targets == {"bundle", "manifest", "plan"}
    assert res["outcomes"].get("error", 0) > 0.6 * res["cases"], res["outcomes"]
