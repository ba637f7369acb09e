import csv

from PIL import Image

from octtrain.data import CLASSES, load_dataset, patient_of, patient_split


def _write(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (16, 16), value).save(path)


def test_patient_id_from_kermany_names(tmp_path):
    assert patient_of(tmp_path / "CNV-53018-1.jpeg") == "53018"
    assert patient_of(tmp_path / "DRUSEN-9280370-12.jpeg") == "9280370"
    assert patient_of(tmp_path / "scan.png") == "scan"


def test_reads_kermany_flat_and_csv_layouts(tmp_path):
    kermany = tmp_path / "OCT2017"
    _write(kermany / "train" / "CNV" / "CNV-1-1.jpeg")
    _write(kermany / "test" / "NORMAL" / "NORMAL-2-1.jpeg")
    _write(kermany / "val" / "DME" / "DME-3-1.jpeg")
    got = load_dataset(kermany)
    assert sorted(s.label for s in got) == ["CNV", "DME", "NORMAL"]

    flat = tmp_path / "flat"
    _write(flat / "DRUSEN" / "DRUSEN-4-1.jpeg")
    assert [s.label for s in load_dataset(flat)] == ["DRUSEN"]

    manifest = tmp_path / "labels.csv"
    _write(tmp_path / "img" / "a.png")
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient"])
        w.writerow(["img/a.png", "dme", "P77"])
    (s,) = load_dataset(manifest)
    assert (s.label, s.patient) == ("DME", "P77")


def test_real_shared_data_loads(shared_oct):
    samples = load_dataset(shared_oct)
    # The shared set grows; labels.csv is its inventory.
    with (shared_oct / "labels.csv").open(newline="") as fh:
        listed = sum(1 for _ in csv.DictReader(fh))
    assert len(samples) == listed
    assert {s.label for s in samples} == set(CLASSES)


def test_patient_split_never_straddles(shared_oct):
    samples = load_dataset(shared_oct)
    for seed in range(5):
        train, val, test = patient_split(samples, seed=seed)
        assert len(train) + len(val) + len(test) == len(samples)
        p = [{s.patient for s in part} for part in (train, val, test)]
        assert not (p[0] & p[1]) and not (p[0] & p[2]) and not (p[1] & p[2]), f"seed {seed}"
        assert {s.label for s in train} == set(CLASSES), "every class is trained on"
