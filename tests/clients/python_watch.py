"""The official Kubernetes Python client against a lab: list_node, then a
watch.Watch().stream that must see an annotation change made meanwhile.

Usage: python_watch.py KUBECONFIG NODE
Prints one line per step; exits non-zero if a step fails or times out.
"""
import sys
import threading
import time

from kubernetes import client, config, watch


def main():
    kubeconfig, node = sys.argv[1], sys.argv[2]
    config.load_kube_config(config_file=kubeconfig)
    v1 = client.CoreV1Api()
    nodes = v1.list_node()
    names = sorted(n.metadata.name for n in nodes.items)
    print("list_node", ",".join(names))
    if node not in names:
        sys.exit(f"{node} not in list_node result {names}")

    def annotate():
        time.sleep(0.3)
        v1.patch_node(node, {"metadata": {"annotations": {"weft.dev/python": "seen"}}})

    threading.Thread(target=annotate, daemon=True).start()
    w = watch.Watch()
    stream = w.stream(v1.list_node, resource_version=nodes.metadata.resource_version, timeout_seconds=15)
    for event in stream:
        obj = event["object"]
        if (obj.metadata.annotations or {}).get("weft.dev/python") == "seen":
            print("watch", event["type"], obj.metadata.name)
            w.stop()
            return
    sys.exit("the watch ended without seeing the annotation change")


if __name__ == "__main__":
    main()
