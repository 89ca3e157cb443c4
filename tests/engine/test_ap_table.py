"""The final AP table prints the matching instability beside the AP, for the student and the teacher."""

from oddetr.engine.trainer import format_ap_table


def test_ap_table_shows_instability_next_to_ap():
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    record = {**{f"student/{k}": 0.1 * i for i, k in enumerate(keys)}, "student/instability": 0.25,
              **{f"teacher/{k}": 0.2 for k in keys}}
    header, student, teacher = format_ap_table(record).splitlines()
    assert header.split() == ["model", *keys, "IS"]
    assert student.split() == ["student", "0.0000", "0.1000", "0.2000", "0.3000", "0.4000", "0.5000", "0.2500"]
    assert teacher.split() == ["teacher", *["0.2000"] * 6, "-"]  # no instability yet: a dash, not a number
