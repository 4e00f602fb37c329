"""Reads objects with the official Kubernetes Python client and prints each
as the JSON the client's models serialize to (one line per object), so a
test can compare them field by field with what another client wrote.

Usage: python_read.py KUBECONFIG (configmap NAMESPACE NAME | pod NAMESPACE NAME | node NAME)...
"""
import json
import sys

from kubernetes import client, config


def main():
    config.load_kube_config(config_file=sys.argv[1])
    v1 = client.CoreV1Api()
    api = client.ApiClient()
    args = sys.argv[2:]
    while args:
        what = args.pop(0)
        if what == "configmap":
            ns, name = args.pop(0), args.pop(0)
            obj = v1.read_namespaced_config_map(name, ns)
        elif what == "pod":
            ns, name = args.pop(0), args.pop(0)
            obj = v1.read_namespaced_pod(name, ns)
        elif what == "node":
            obj = v1.read_node(args.pop(0))
        else:
            sys.exit(f"unknown kind {what}")
        print(json.dumps(api.sanitize_for_serialization(obj), sort_keys=True))


if __name__ == "__main__":
    main()
