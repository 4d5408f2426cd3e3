"""Tools for k8s/: copy infra/ files into it, and check its manifests against the budget."""
