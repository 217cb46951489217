"""The emulated wide-area network (launch/emulated_wan.py), started for real: namespaces, TUN devices, the link
shaper, measured from inside the namespaces; and a training run across it.

Root is needed (CI runs as root); elsewhere these tests skip and say so.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys

import pytest

from tests.helpers import REPO

SCRIPT = REPO / "launch" / "emulated_wan.py"
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
    reason="the emulated network needs root, /dev/net/tun and iproute2's ip")

_TCP_SERVER = """
import socket
tcp = socket.socket(); tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); tcp.bind(("10.99.0.2", 5000))
tcp.listen(); print("listening", flush=True)
conn, _ = tcp.accept()
while True:  # echo one byte per ping; swallow bulk data until the sender shuts down, then confirm
    data = conn.recv(1 << 16)
    if not data:
        break
    if data == b"p":
        conn.sendall(b"p")
conn.sendall(b"d"); conn.close()
"""

_TCP_CLIENT = """
import json, socket, time
s = socket.create_connection(("10.99.0.2", 5000)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(15):
    t = time.perf_counter(); s.sendall(b"p"); s.recv(1); rtts.append(time.perf_counter() - t)
payload = 4 << 20
t = time.perf_counter(); s.sendall(b"x" * payload); s.shutdown(socket.SHUT_WR); s.recv(1)
print(json.dumps({"rtt_s": rtts, "bulk_bytes": payload, "bulk_s": time.perf_counter() - t}))
"""

_UDP_SERVER = """
import socket
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("10.99.0.2", 5001))
udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22); print("listening", flush=True)
got = 0
udp.settimeout(60)  # the first datagram: however long the client takes to start
try:
    while True:
        udp.recv(2048); got += 1; udp.settimeout(3)
except socket.timeout:
    pass
print(got, flush=True)
"""

_UDP_CLIENT = """
import socket, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(2000):
    u.sendto(b"u" * 100, ("10.99.0.2", 5001))
    time.sleep(0.0002)
"""


def _up(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "up", *args], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("ready:"), line
    return proc


def _measure(link: list[str], server: str, client: str) -> tuple[str, str, dict]:
    """Bring up two agents' namespaces joined by ``link``, run ``server`` in agent 1's and ``client`` in agent 0's;
    return what each printed and the shaper's counters of the 0 -> 1 link. The namespaces must be gone after."""
    up = _up("--agents", "2", "--name", "dmdtest", *link)
    try:
        serving = subprocess.Popen(["ip", "netns", "exec", "dmdtest-1", sys.executable, "-c", server],
                                   stdout=subprocess.PIPE, text=True)
        assert serving.stdout.readline().strip() == "listening"
        sent = subprocess.run(["ip", "netns", "exec", "dmdtest-0", sys.executable, "-c", client],
                              capture_output=True, text=True, timeout=300)
        assert sent.returncode == 0, sent.stderr
        served = serving.communicate(timeout=120)[0]
    finally:
        up.terminate()
        counters = json.loads(up.communicate(timeout=60)[0].strip().splitlines()[-1])["links"]
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "dmdtest-" not in names
    return sent.stdout, served, counters["0->1"]


def test_links_have_the_latency_and_bandwidth_they_were_given():
    """Two agents' namespaces joined by a 25 ms, 20 Mbit/s link, measured from inside: a TCP ping-pong and a 4 MiB
    bulk transfer. A round trip can never beat twice the one-way delay and a transfer never the rate (hard lower
    bounds, whatever the load); the tolerances above them allow for a busy machine: round trip below
    2 x 25 ms + 40 ms (median), throughput above half the rate. The link is lossless so that TCP's congestion
    control, not the emulation, cannot decide the throughput. Catches: shaping not in effect (packets bypassing the
    TUN devices: a sub-millisecond round trip), delay applied once per round trip instead of per direction, a rate
    in bytes rather than bits, and namespaces left behind."""
    delay_ms, rate_mbit = 25.0, 20.0
    printed, _, there = _measure(["--delay-ms", str(delay_ms), "--rate-mbit", str(rate_mbit)], _TCP_SERVER,
                                 _TCP_CLIENT)
    got = json.loads(printed)
    assert min(got["rtt_s"]) >= 2 * delay_ms / 1e3
    assert statistics.median(got["rtt_s"]) < 2 * delay_ms / 1e3 + 0.040, got["rtt_s"]
    rate = got["bulk_bytes"] * 8 / got["bulk_s"] / 1e6
    assert rate_mbit / 2 < rate <= rate_mbit, rate
    assert there["bytes"] > got["bulk_bytes"] and there["lost"] == 0


def test_links_drop_the_share_of_packets_they_were_given():
    """A 10 %-loss link: of 2000 UDP datagrams sent across it, 90 % arrive (within 6 points: the binomial spread
    is 0.7 points), and the shaper's counters agree with the share the sockets saw. Catches loss not applied,
    applied per round trip or in percent read as a fraction, and drops not counted."""
    loss = 10.0
    _, served, there = _measure(["--delay-ms", "5", "--loss-pct", str(loss)], _UDP_SERVER, _UDP_CLIENT)
    received = int(served.strip())
    assert abs(received / 2000 - (1 - loss / 100)) < 0.06, received
    assert there["packets"] == received and there["overflow"] == 0
    assert abs(there["lost"] / (there["lost"] + there["packets"]) - loss / 100) < 0.03


def test_a_run_across_the_emulated_network_records_it_and_equals_the_simulator(tmp_path):
    """Three torchrun nodes, one per namespace, train over 10 ms links (overlapped combine): the run directory
    holds network.json with the settings and what each link carried, the run's wall time is at least one link
    delay per iteration (every round needs a message across a link), and its figures equal the simulator's
    per-agent engine with the same overrides exactly. Catches: agents talking over loopback instead of the
    emulated links (no bytes counted on the links), settings not recorded, and a result that depends on the
    network's timing."""
    run_dir, iters, delay_ms = tmp_path / "wan", 12, 10.0
    overrides = ["topology=ring", "topology.num_agents=3", f"train.iterations={iters}", "train.eval_every=6",
                 "train.log_every=6", "task.eval_tasks=20", "maml.final_adapt_steps=3", "strategy.overlap=true",
                 "train.save_models=false"]
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", "--agents", "3", "--delay-ms", str(delay_ms),
                           "--rate-mbit", "100", "--name", "dmdrun", "--run-dir", str(run_dir), "--", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    network = json.loads((run_dir / "network.json").read_text())
    assert network["link"]["delay_ms"] == delay_ms and network["link"]["rate_mbit"] == 100
    assert network["addresses"] == ["10.99.0.1", "10.99.0.2", "10.99.0.3"]
    summary = json.loads((run_dir / "summary.json").read_text())
    on_links = {pair: c["bytes"] for pair, c in network["links"].items()}
    for k, agent in enumerate(summary["agents"]):
        # every state an agent sent crossed its links (plus headers and the store's traffic)
        assert sum(b for pair, b in on_links.items() if pair.startswith(f"{k}->")) > agent["bytes_sent"]
    records = [json.loads(x) for x in (run_dir / "metrics" / "agent0.jsonl").read_text().splitlines()]
    assert records[-1]["wall_s"] >= iters * delay_ms / 1e3
    sim_dir = tmp_path / "sim"
    sim = subprocess.run([sys.executable, "-m", "dif_maml_dist.train", *overrides, "runtime=simulate",
                          "runtime.vectorize=false", f"hydra.run.dir={sim_dir}"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert sim.returncode == 0, sim.stderr[-3000:]
    simulated = json.loads((sim_dir / "summary.json").read_text())
    assert simulated["centroid_test_loss"] == summary["centroid_test_loss"]
    assert [a["adaptation_curve"] for a in simulated["agents"]] == [a["adaptation_curve"] for a in summary["agents"]]


def test_bad_settings_are_one_line_errors_and_leave_no_namespace(tmp_path):
    """A negative delay, a loss of 100 %, a namespace name already taken and a run directory holding a finished
    run are refused in one line with exit status 2, and nothing is left behind: no namespace, the finished run's
    folder as it was. Catches tracebacks, half-built networks and a launch that writes into a finished run."""
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "summary.json").write_text("earlier results\n")
    subprocess.run(["ip", "netns", "add", "dmdtaken-0"], check=True)
    try:
        for args, expect in [(["up", "--delay-ms", "-1"], "--delay-ms must not be negative"),
                             (["up", "--loss-pct", "100"], "--loss-pct must be in [0, 100)"),
                             (["up", "--name", "dmdtaken"], "network namespace dmdtaken-0 exists already"),
                             (["run", "--run-dir", str(finished), "--", "topology=ring", "topology.num_agents=2"],
                              "already holds a run")]:
            proc = subprocess.run([sys.executable, str(SCRIPT), *args[:1], "--agents", "2", *args[1:]],
                                  cwd=REPO, capture_output=True, text=True, timeout=120)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1 and expect in lines[0], proc.stderr
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        assert [n for n in names if n.startswith("dmd") and n != "dmdtaken-0"] == []
        assert sorted(p.name for p in finished.iterdir()) == ["summary.json"]
    finally:
        subprocess.run(["ip", "netns", "del", "dmdtaken-0"])
