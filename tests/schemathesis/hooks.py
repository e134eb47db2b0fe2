"""Schemathesis hooks for tests/schemathesis.rs.

- Every pull stays on this machine: a fuzzed manifest names any image, and deploying it
  (with `scale.min > 0`) or pulling it would make Docker reach for a public registry, so
  every manifest sent names a loopback registry that does not exist.
- Half the reads and calls name a function the test deployed, so the fuzz reaches real
  handlers; removals and deploys never touch fz-echo (the test calls it warm afterwards)
  nor the embedded node.
- A followed log never ends: logs are read without `follow`."""

import random

import schemathesis

LOOPBACK_IMAGE = "127.0.0.1:9/fuzz:none"
FUNCTIONS = ["fz-echo", "fz-victim", "fz-private"]
KEPT = {"fz-echo": "fz-victim", "local": "fz-node"}


@schemathesis.hook
def before_call(context, case, **kwargs):
    if isinstance(case.body, dict) and "image" in case.body:
        case.body["image"] = LOOPBACK_IMAGE
    elif isinstance(case.body, str) and "image" in case.body:
        case.body = "\n".join(
            f'image = "{LOOPBACK_IMAGE}"' if line.strip().startswith("image") else line
            for line in case.body.split("\n")
        )
    params = case.path_parameters
    method = case.method.upper()
    if params and "name" in params:
        changes = method in ("PUT", "DELETE") or case.path.startswith("/api/v1/nodes/")
        if changes:
            params["name"] = KEPT.get(params["name"], params["name"])
        elif random.random() < 0.5:
            params["name"] = random.choice(FUNCTIONS)
    if case.path.endswith("/logs"):
        if case.query is None:
            case.query = {}
        case.query["follow"] = "false"
