"""Locust users for bench_serve.py's cross-check: each posts a real test user's request to /rank at a constant
throughput (LAYERVIZ_USER_RATE requests/s per user; payloads from LAYERVIZ_PAYLOADS)."""

import json
import os
import random

from locust import HttpUser, constant_throughput, task

PAYLOADS = json.loads(open(os.environ["LAYERVIZ_PAYLOADS"]).read())


class Ranker(HttpUser):
    wait_time = constant_throughput(float(os.environ.get("LAYERVIZ_USER_RATE", "0.5")))

    @task
    def rank(self):
        self.client.post("/rank", json=random.choice(PAYLOADS))
