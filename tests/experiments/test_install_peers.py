"""experiments/install_peers.sh (run on the device machine): archives are extracted into the
site folder, and tokamax gets the stand-in for xprof that its import needs."""

import os
import subprocess
import sys
import tarfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def test_archives_are_extracted_and_tokamax_gets_its_xprof_stand_in(tmp_path):
  src = tmp_path / "pkg"
  (src / "tokamax").mkdir(parents=True)
  (src / "tokamax" / "__init__.py").write_text("from xprof.cli.tools import get_kernel_stats_tool\n"
                                               "VALUE = 7\n")
  peers = tmp_path / "peers"
  peers.mkdir()
  with tarfile.open(peers / "tokamax-0.tar.xz", "w:xz") as tar:
    tar.add(src / "tokamax", arcname="tokamax")
  site = tmp_path / "site"
  env = dict(os.environ, PEER_SITE=str(site))
  subprocess.run(["bash", os.path.join(ROOT, "experiments", "install_peers.sh"), str(peers),
                  str(tmp_path / "empty")], check=True, env=env)
  out = subprocess.run([sys.executable, "-c", "import tokamax; print(tokamax.VALUE)"],
                       env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "7"
