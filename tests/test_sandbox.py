"""`provision sandbox up` on an engine where the images it uses carry other tags too.

Why: the base image was saved for the sandbox with `save(named=True)`, which names the archive
after the image's first tag. Once the same image was also tagged `local/bookworm:min`, the
archive loaded inside the sandbox under that name, the [image] base was missing there, and
`provision verify sandbox` tried Docker Hub. The archive must carry the name the inventory uses.
"""

from __future__ import annotations

import json

from provision import sandbox as sandboxes
from provision.inventory import load_inventory
from provision.versions import resolve_image


def test_the_base_archive_is_named_as_the_inventory_names_it(make_host) -> None:
    client = sandboxes.docker_client()
    base = sandboxes.base_image(client, log=lambda _: None)
    image = client.images.get(base)
    # Tags sort before the real one, so a "first tag" is likely another name.
    aliases = ["a-local/bookworm:min", "0-mirror/debian:bookworm"]
    for alias in aliases:
        repository, tag = alias.split(":")
        image.tag(repository, tag)
    try:
        host = make_host(try_it=True)
    finally:
        for alias in aliases:
            client.images.remove(alias, noprune=True)
    wanted = resolve_image(load_inventory(host.inventory).image).base
    code, manifest = host.exec(f"tar -xOf {sandboxes.BASE_ARCHIVE} manifest.json")
    assert code == 0, manifest
    assert json.loads(manifest)[0]["RepoTags"] == [wanted]


def test_the_engine_and_the_homes_lie_on_volumes_that_down_removes(own_host) -> None:
    """The system daemon's data (/var/lib/docker) and the homes are named volumes, so neither
    the system daemon's overlay2 nor a member's rootless one sits on the sandbox container's
    own overlay root (there hers fell back to fuse-overlayfs). `sandbox down` leaves no volume
    behind."""
    for path in ("/var/lib/docker", "/home"):
        code, fstype = own_host.exec(f"findmnt -n -o FSTYPE --target {path}")
        assert code == 0 and fstype.strip() not in ("overlay", "fuse.fuse-overlayfs"), fstype
    volumes = set(sandboxes.volume_names(own_host.name))
    assert len(volumes) == 2
    client = sandboxes.docker_client()
    assert volumes <= {v.name for v in client.volumes.list()}
    assert sandboxes.down(own_host.name, own_host.inventory, log=lambda _: None)
    assert not volumes & {v.name for v in client.volumes.list()}

