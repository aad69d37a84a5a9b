"""experiments/schedule_signatures.py: the workloads' schedules without a model, on CPU."""

from experiments import schedule_signatures


def test_prints_one_row_per_workload(capsys):
  assert schedule_signatures.main(["--model", "tiny", "--scale", "0.02", "--group_scale",
                                   "0.05", "--length_scale", "0.02", "--memory_budget", "4e6", "--max_batch", "16",
                                   "--min_shared_tokens", "16"]) == 0
  rows = [line for line in capsys.readouterr().out.splitlines()
          if line.startswith("| ") and not line.startswith("| workload")]
  assert [r.split(" | ")[0][2:] for r in rows] == ["system", "document", "samples", "control"]
  for r in rows:
    requests, batches, signatures = (int(x) for x in r.split(" | ")[1:4])
    assert requests > 0 and 1 <= signatures <= batches <= requests
