"""The place-and-season prior: kernels, fitting from Darwin Core records, storage, checks."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from biolit_id.cli.main import main
from biolit_id.cli.training.prior_fit import (
    OccurrenceError,
    clean_records,
    fit_prior,
    match_names,
    read_occurrences,
)
from biolit_id.index.core.errors import InvalidRequestError
from biolit_id.server.decision.prior import (
    PRIOR_NPZ,
    PriorError,
    Where,
    check_location,
    day_angle,
    load_prior,
    parse_observed_on,
    relative_factor,
    spatial_concentration,
    unit_vectors,
    vmf_sphere,
    von_mises,
)

ROSCOFF, MARSEILLE = (48.73, -3.98), (43.30, 5.37)


def records(seed: int = 0, per_species: int = 150) -> pd.DataFrame:
    """Synthetic Darwin Core records: a Channel crab, a Mediterranean one, a spring jelly."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, (lat, lon), peak in (("Carcinus maenas (Linnaeus, 1758)", ROSCOFF, None),
                                   ("Eriphia verrucosa", MARSEILLE, None),
                                   ("Velella velella", ROSCOFF, 110)):
        for _ in range(per_species):
            day = rng.uniform(0, 365) if peak is None else (peak + rng.normal(0, 15)) % 365
            date = dt.date(2022, 1, 1) + dt.timedelta(days=int(day))
            rows.append({"scientificName": name,
                         "decimalLatitude": lat + rng.normal(0, 0.1),
                         "decimalLongitude": lon + rng.normal(0, 0.1),
                         "eventDate": date.isoformat() + ("T09:30:00Z" if day < 100 else "")})
    rows.append({"scientificName": "Carcinus maenas", "decimalLatitude": 0,
                 "decimalLongitude": 0, "eventDate": "2022-05-01"})  # placeholder coordinates
    return pd.DataFrame(rows)


def fitted(tmp_path: Path):
    frame = records()
    names, lat, lon, day, report = clean_records(frame, ["Carcinus maenas", "Eriphia verrucosa",
                                                         "Velella velella"])
    prior = fit_prior(names, lat, lon, day)
    prior.save(tmp_path / "prior")
    return load_prior(tmp_path / "prior"), report


def test_kernels_integrate_to_one() -> None:
    theta = np.linspace(-np.pi, np.pi, 20001)
    assert np.trapezoid(von_mises(theta, 8.0), theta) == pytest.approx(1.0, abs=1e-4)
    # vMF on the sphere: integrate over the polar angle from the kernel's centre.
    kappa = float(spatial_concentration(200.0))
    polar = np.linspace(0, np.pi, 200001)
    density = vmf_sphere(np.cos(polar), kappa) * 2 * np.pi * np.sin(polar)
    assert np.trapezoid(density, polar) == pytest.approx(1.0, abs=1e-3)
    # At small bandwidths it is a Gaussian in distance: one std away, exp(-1/2).
    one_std = np.cos(200.0 / 6371.0088)
    assert vmf_sphere(one_std, kappa) / vmf_sphere(1.0, kappa) == pytest.approx(
        np.exp(-0.5), rel=1e-3)


def test_fit_reads_dwc_and_drops_bad_records(tmp_path: Path) -> None:
    prior, report = fitted(tmp_path)
    assert report["used"] == 450 and report["dropped_bad_coordinates_or_name"] == 1
    assert set(prior.species) == {"Carcinus maenas", "Eriphia verrucosa", "Velella velella"}
    assert prior.record_counts["Carcinus maenas"] == 150  # authorship matched to the name
    assert len(prior.version) == 16


def test_place_and_season_move_the_factor(tmp_path: Path) -> None:
    prior, _ = fitted(tmp_path)
    names = ["Carcinus maenas", "Eriphia verrucosa", "Velella velella", "Patella vulgata"]

    def factor(where, day, floor=0.05):
        return relative_factor(*prior.densities(names, where, day), floor)

    at_roscoff = factor(Where(*ROSCOFF), None)
    at_marseille = factor(Where(*MARSEILLE), None)
    assert at_roscoff[0] > 1.0 > at_roscoff[1]
    assert at_marseille[1] > 1.0 > at_marseille[0]
    # Never recorded nearby: the floor, never zero, so photos can still win.
    assert at_marseille[0] == pytest.approx(0.05 / 1.05, rel=0.05)
    assert at_roscoff[3] == 1.0 == at_marseille[3]  # no records at all: no information
    spring = factor(None, day_angle(dt.date(2024, 4, 20)))
    autumn = factor(None, day_angle(dt.date(2024, 10, 20)))
    assert spring[2] > 1.0 > autumn[2]
    # All year: about the same density (its factor moves: it is relative to the others).
    dens_spring = prior.densities(names, None, day_angle(dt.date(2024, 4, 20)))[0]
    dens_autumn = prior.densities(names, None, day_angle(dt.date(2024, 10, 20)))[0]
    assert dens_spring[0] == pytest.approx(dens_autumn[0], rel=0.35)
    assert dens_spring[2] > 5 * dens_autumn[2]
    # Far from every record the prior says nothing.
    mid_atlantic = factor(Where(30.0, -40.0), None)
    np.testing.assert_allclose(mid_atlantic, 1.0, atol=1e-6)
    # A vague position widens the kernel: less sure the Mediterranean crab is absent.
    vague = factor(Where(*ROSCOFF, uncertainty_km=400.0), None)
    assert vague[1] > at_roscoff[1]


def test_storage_refuses_a_mismatched_pair(tmp_path: Path) -> None:
    prior, _ = fitted(tmp_path)
    again = load_prior(tmp_path / "prior")
    assert again.version == prior.version
    np.testing.assert_allclose(again.bandwidth_km, prior.bandwidth_km)
    (tmp_path / "prior" / PRIOR_NPZ).write_bytes(b"not an npz")
    with pytest.raises(PriorError):
        load_prior(tmp_path / "prior")


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_read_occurrences_formats(tmp_path: Path, suffix: str) -> None:
    frame = records(per_species=5)
    path = tmp_path / f"occ{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False)
    back = read_occurrences(path)
    assert len(back) == len(frame)
    pd.DataFrame({"scientificName": ["x"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(OccurrenceError, match="decimalLatitude"):
        read_occurrences(tmp_path / "bad.csv")


def test_name_matching_and_dates() -> None:
    known = ["Carcinus maenas", "Littorina fabalis/obtusata", "Patella sp."]
    got = match_names(["Carcinus maenas (Linnaeus, 1758)", "Patella sp.",
                       "Littorina fabalis/obtusata", "Nucella lapillus (L.)"], known)
    assert got == ["Carcinus maenas", "Patella sp.", "Littorina fabalis/obtusata",
                   "Nucella lapillus"]
    frame = pd.DataFrame({"scientificName": ["a"] * 5, "decimalLatitude": [1.0] * 5,
                          "decimalLongitude": [1.0] * 5,
                          "eventDate": ["2021-06-01", "2021-06-01T10:00:00Z", "2021-06",
                                        "2021-06-01/2021-06-03", "sometime"]})
    *_, day, _ = clean_records(frame, [])
    june = day_angle(dt.date(2021, 6, 1))
    assert day[0] == day[1] == day[3] == pytest.approx(june)
    assert day[2] == pytest.approx(day_angle(dt.date(2021, 6, 15)))
    assert np.isnan(day[4])


@pytest.mark.parametrize("text", ["2024-13-01", "2024-02-30", "2024/01/01", "20240101",
                                  "yesterday", "2999-01-01"])
def test_bad_dates_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequestError, match="observed_on"):
        parse_observed_on(text)


def test_good_dates_and_locations() -> None:
    assert parse_observed_on("") is None
    assert parse_observed_on("2024-02-29") == pytest.approx(day_angle(dt.date(2024, 2, 29)))
    assert check_location(48.7, -3.9, 50.0).uncertainty_km == pytest.approx(0.05)
    for bad in ((91.0, 0.0, 0.0), (0.0, 181.0, 0.0), (0.0, 0.0, -1.0), (float("nan"), 0, 0)):
        with pytest.raises(InvalidRequestError, match="location"):
            check_location(*bad)
    np.testing.assert_allclose(np.linalg.norm(unit_vectors(np.array([10.0]),
                                                           np.array([20.0])), axis=1), 1.0)


def test_cli_fit_writes_to_the_data_dir(tmp_path: Path, capsys) -> None:
    path = tmp_path / "occ.csv"
    records().to_csv(path, index=False)
    assert main(["prior", "fit", "--occurrences", str(path), "--data-dir",
                 str(tmp_path / "data")]) == 0
    assert "3 species" in capsys.readouterr().out
    assert load_prior(tmp_path / "data" / "prior").record_counts["Velella velella"] == 150
    assert main(["prior", "fit", "--occurrences", str(tmp_path / "missing.csv"),
                 "--out", str(tmp_path / "x")]) == 2
