"""Real part features (shared/data/mini-mars-parts): the training-free rows reproduce the
reference figures of SPEC §8, measured independently of this code base."""
from __future__ import annotations

import pytest

from orgnn.io.features import load_split_dir
from orgnn.reconstruction.pipeline import AblationConfig, run_ablation
from orgnn.reconstruction.training import SearchConfig, TrainConfig


@pytest.fixture(scope="module")
def mars(request):
    from tests.conftest import shared_data_dir

    path = shared_data_dir() / "mini-mars-parts"
    if not path.is_dir():
        pytest.skip(f"mini-mars-parts not found at {path} (set ORGNN_SHARED_DATA)")
    return {"occluded": load_split_dir(path / "occluded"), "clean": load_split_dir(path / "clean")}


def test_reference_rows_match_spec(mars):
    spec = AblationConfig(search=SearchConfig(k=10, theta=0.7))  # SPEC §8's setting
    occ = run_ablation(mars["occluded"], spec, rows=("baseline", "oan", "avg"),
                       progress=False).rows
    clean = run_ablation(mars["clean"], rows=("baseline",), progress=False).rows
    assert (clean["baseline"]["mAP"], clean["baseline"]["rank1"]) == pytest.approx((60.2, 70.0),
                                                                                  abs=0.05)
    assert (occ["baseline"]["mAP"], occ["baseline"]["rank1"]) == pytest.approx((43.5, 50.7),
                                                                              abs=0.05)
    assert (occ["oan"]["mAP"], occ["oan"]["rank1"]) == pytest.approx((49.0, 59.6), abs=0.05)
    assert (occ["avg"]["mAP"], occ["avg"]["rank1"]) == pytest.approx((60.9, 59.3), abs=0.05)


def test_orgnn_recovers_the_clean_map(mars):
    from orgnn.cli.commands import DEFAULT_EPOCHS

    config = AblationConfig(train=TrainConfig(epochs=DEFAULT_EPOCHS))
    result = run_ablation(mars["occluded"], config, rows=("avg", "orgnn"), progress=False)
    # The threshold calibrated on 16 training identities sits above 0.7 here (high cosines):
    # a few queries keep no neighbour (55 of 898 measured), far from the warning's quarter.
    assert result.empty_neighbourhoods["query"] < 0.1 * mars["occluded"]["query"].num_images
    assert result.rows["orgnn"]["mAP"] >= 60.2                  # the clean baseline's mAP
    assert result.rows["orgnn"]["mAP"] >= result.rows["avg"]["mAP"]     # 62.2 vs 59.6


def test_other_protocols_are_built_as_documented(mars):
    import sys

    from tests.conftest import shared_data_dir

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]
                           / "benchmarks"))
    from real_protocols import protocols

    built = protocols(shared_data_dir() / "mini-mars-parts")
    assert set(built) == {"occluded-duke", "occluded-reid", "occluded-gallery", "swapped"}
    for name, splits in built.items():
        assert (splits["query"].visibility < 1).any(1).all(), name      # every query occluded
        assert not set(splits["query"].paths) & set(splits["gallery"].paths), name
    assert (built["occluded-reid"]["gallery"].visibility == 1).all()
    occluded = (built["occluded-gallery"]["gallery"].visibility < 1).any(1).mean()
    assert 0.4 < occluded < 0.6
    swapped = built["swapped"]
    assert set(swapped["train"].pids) == set(mars["occluded"]["query"].pids)
    assert set(swapped["query"].pids) == set(swapped["gallery"].pids) \
        == set(mars["occluded"]["train"].pids)
    assert (swapped["query"].camids == 0).all() and (swapped["gallery"].camids == 1).all()


@pytest.fixture(scope="module")
def cuhk03():
    from tests.conftest import shared_data_dir

    path = shared_data_dir() / "cuhk03-parts"
    if not path.is_dir():
        pytest.skip(f"cuhk03-parts not found at {path} (set ORGNN_SHARED_DATA)")
    return load_split_dir(path / "occluded")


def test_cuhk03_orgnn_beats_the_peer_rows_and_its_untrained_self(cuhk03):
    """443 real training identities, the library defaults: `orgnn` beats what a Re-ID
    toolbox user runs on the same files (visible-part global feature, FastReID's AQE, each
    with and without k-reciprocal re-ranking), plain averaging and training-free re-ranking,
    and the trained OR-GNN beats the same run with 0 epochs of Eq. 7 by 3 mAP."""
    from orgnn.cli.commands import DEFAULT_EPOCHS
    from orgnn.reconstruction.pipeline import PEER_ROWS
    from orgnn.reconstruction.training import train_orgnn

    assert DEFAULT_EPOCHS > 0
    config = AblationConfig(train=TrainConfig(epochs=DEFAULT_EPOCHS))
    trained = train_orgnn(cuhk03["train"], config.train, progress=False)
    untrained = train_orgnn(cuhk03["train"], TrainConfig(**{**config.train.__dict__,
                                                             "epochs": 0}),
                            progress=False, scorer=trained.scorer)     # the same scorer
    result = run_ablation(cuhk03, config, rows=("oan", "avg", "orgnn", "oan_rr", *PEER_ROWS),
                          progress=False, models={"orgnn": trained})
    zero = run_ablation(cuhk03, config, rows=("orgnn",), progress=False,
                        models={"orgnn": untrained}).rows["orgnn"]
    rows = result.rows
    best_peer = max(rows[name]["mAP"] for name in PEER_ROWS)
    assert rows["orgnn"]["mAP"] >= best_peer
    assert rows["orgnn"]["mAP"] >= rows["oan_rr"]["mAP"]
    assert rows["orgnn"]["mAP"] >= zero["mAP"] + 3                  # learning pays
    assert rows["orgnn"]["rank1"] > rows["oan"]["rank1"]
    # The calibrated threshold leaves (almost) nobody without neighbours here, where the
    # paper's 0.7 left 408 of 600 queries empty.
    assert result.empty_neighbourhoods["query"] < 0.05 * cuhk03["query"].num_images
    assert result.config["search"]["theta"] < 0.7
