"""Pipeline processes for the resume tests, forked from one that has already imported the pipeline.

Each run is a new process with nothing of any run in its memory, as a resumed run after a crash is,
without paying the ~10 s of importing torch, transformers, Prefect and MLflow every time (the crash
matrix starts over a dozen). The server process imports `flows.iterative_grpo` and runs no flow, so
it holds no threads, locks or run state that a fork could copy into a child.

    python -m tests.forked_runs      reads one JSON request a line: {"argv": [...], "env": {...}, "log": path}
                                     runs main(argv) in a forked child (stdout and stderr to `log`), and
                                     answers {"returncode": n} (-9 for a child that killed itself)
"""
import json
import os
import subprocess
import sys
import traceback


def serve() -> None:
    import flows.iterative_grpo as entry  # the imports every child would otherwise pay

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.environ.update(request["env"])
                code = entry.main(request["argv"])
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:  # noqa: BLE001 -- reported through the log and the exit code
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


class ForkServer:
    """The test side: `run(argv, env, log)` -> the child's exit code, one run at a time."""

    def __init__(self, cwd, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.forked_runs"], cwd=cwd, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, argv: list[str], env: dict[str, str], log) -> int:
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the fork server died (exit {self.proc.wait()})")
        return json.loads(answer)["returncode"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


if __name__ == "__main__":
    serve()
