"""Planted-truth files: gandl-synth's long layout and the wide layout agree."""
import numpy as np

from gandl_jax.evaluate import truth


def test_long_layout_of_the_synthetic_generator(tmp_path):
  long = tmp_path / "long.csv"
  long.write_text(
      "kind,name,cell_type,experiment,plate,channel,parameter,value,description\n"
      "plate,,,HRCE-1,1,1,gain,1.08,x\n"
      "compound,Remdesivir (GS-5734),,,,,role,rescue,x\n"
      "compound,Remdesivir (GS-5734),,,,,ec50_uM,0.5,x\n"
      "compound,Remdesivir (GS-5734),,,,,hill,1.5,x\n"
      "compound,Bortezomib,,,,,role,toxic,x\n"
      "compound,Bortezomib,,,,,tc50_uM,1.0,x\n"
      "compound,Ribavirin,,,,,role,inert,x\n")
  wide = tmp_path / "wide.csv"
  wide.write_text("compound,role,ec50_uM\nRemdesivir (GS-5734),rescue,0.5\n"
                  "Bortezomib,toxic,\nRibavirin,inert,\n")
  a = truth.read_truth(str(long)).sort_values("treatment").reset_index(drop=True)
  b = truth.read_truth(str(wide)).sort_values("treatment").reset_index(drop=True)
  assert list(a["treatment"]) == ["Bortezomib", "Remdesivir (GS-5734)",
                                  "Ribavirin"]
  assert list(a["true_hit"]) == [False, True, False]
  np.testing.assert_allclose(a["true_ec50"], b["true_ec50"])
  assert list(a["role"]) == list(b["role"])
