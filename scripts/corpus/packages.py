"""Fetches packages into the cache without root: `apt-get download` + `dpkg-deb -x`, `npm pack` + tar.

Cache layout (each entry appears whole or not at all: written under a temporary name, then renamed):
  CACHE/deb/NAME_VERSION_ARCH.deb      as apt-get names it (':' of an epoch written as %3a)
  CACHE/npm/NAME-VERSION.tgz           '@scope/name' written as 'scope-name'
  CACHE/x/apt/NAME_VERSION/            the extracted .deb
  CACHE/x/npm/NAME-VERSION/            the extracted tarball (its 'package/' folder inside)
A later run finds them there and downloads or extracts nothing again.
"""
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

APT_UPDATE_HINT = ("the apt package lists seem empty or stale: run `sudo apt-get update` once "
                   "(apt-get download needs no root after that)")


@dataclass(frozen=True)
class PackageRef:
    registry: str      # "apt", "npm", or "local" (already on this machine)
    name: str
    version: str = ""  # npm: the pinned version; apt: empty = the candidate of the apt lists
    path: str = ""     # local: the folder it provides


@dataclass
class Fetched:
    root: Path = None   # where its files are (the extraction root, or the local folder)
    version: str = ""
    error: str = ""     # why it is not available; empty when it is


def _run(cmd, cwd=None):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _fresh_tmp(path: Path) -> Path:
    """PATH.tmp, with whatever an interrupted run left there removed."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    return tmp


def _safe(name: str) -> str:
    return name.replace(":", "%3a").replace("/", "-").lstrip("@")


# ---- apt -------------------------------------------------------------------------------------
def apt_candidates(names):
    """{name: candidate version or None}, from one `apt-cache policy` call."""
    out = _run(["apt-cache", "policy", *names]).stdout
    found, current = {}, None
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            found[current] = None if version == "(none)" else version
    return {n: found.get(n) for n in names}


def _cached_debs(deb_dir: Path, name: str):
    """{version: path} of the .deb files of `name` already in the cache."""
    debs = {}
    for path in sorted(deb_dir.glob(f"{name}_*.deb")):
        version = path.name[len(name) + 1:].rsplit("_", 1)[0].replace("%3a", ":")
        debs[version] = path
    return debs


def _apt_download(names, deb_dir: Path, log):
    """Downloads the candidates of `names` into deb_dir; returns {name: error} for those that failed."""
    tmp = _fresh_tmp(deb_dir / "download")
    tmp.mkdir(parents=True)
    cmd = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:  # as root apt drops to the _apt user, which cannot write here
        cmd += ["-o", "APT::Sandbox::User=root"]
    log(f"apt-get download {' '.join(names)}")
    errors = {}
    if _run(cmd + list(names), cwd=tmp).returncode != 0:
        for name in names:  # one by one, to tell which package failed
            r = _run(cmd + [name], cwd=tmp)
            if r.returncode != 0:
                errors[name] = (r.stderr.strip().splitlines() or ["apt-get download failed"])[-1]
    for path in sorted(tmp.glob("*.deb")):
        os.replace(path, deb_dir / path.name)
    shutil.rmtree(tmp)
    return errors


def fetch_apt(names, cache: Path, log):
    deb_dir = cache / "deb"
    deb_dir.mkdir(parents=True, exist_ok=True)
    candidates = apt_candidates(names)
    chosen, missing, result = {}, [], {}
    for name in names:
        cached = _cached_debs(deb_dir, name)
        want = candidates[name]
        if want and want in cached:
            chosen[name] = (want, cached[want])
        elif want:
            missing.append(name)
        elif cached:  # the lists lost it (or were never fetched): use what the cache has
            version = sorted(cached)[-1]
            log(f"warning: {name}: not in the apt lists; using the cached {version}")
            chosen[name] = (version, cached[version])
        else:
            result[name] = Fetched(error=f"{name}: not found in the apt lists ({APT_UPDATE_HINT})")
    if missing:
        errors = _apt_download(missing, deb_dir, log)
        for name in missing:
            cached = _cached_debs(deb_dir, name)
            if candidates[name] in cached:
                chosen[name] = (candidates[name], cached[candidates[name]])
            else:
                result[name] = Fetched(error=f"{name}: apt-get download failed: {errors.get(name, '?')}")
    for name, (version, deb) in chosen.items():
        root = cache / "x" / "apt" / f"{name}_{_safe(version)}"
        if not root.is_dir():
            root.parent.mkdir(parents=True, exist_ok=True)
            tmp = _fresh_tmp(root)
            r = _run(["dpkg-deb", "-x", str(deb), str(tmp)])
            if r.returncode != 0:
                why = " / ".join(r.stderr.strip().splitlines())
                result[name] = Fetched(error=f"{name}: dpkg-deb -x failed: {why}")
                continue
            os.replace(tmp, root)
        result[name] = Fetched(root=root, version=version)
    return result


# ---- npm -------------------------------------------------------------------------------------
def _extract_tarball(tgz: Path, dest: Path):
    """Extracts a .tgz with GNU tar (several times faster than tarfile on 12,000 small files).

    GNU tar strips leading '/' and skips members with '..', so nothing lands outside dest.
    """
    dest.mkdir(parents=True)
    r = _run(["tar", "-xzf", str(tgz), "-C", str(dest), "--no-same-owner", "--no-same-permissions"])
    if r.returncode != 0:
        raise RuntimeError(f"tar -xzf {tgz} failed: {r.stderr.strip()}")


def _npm_error(r):
    """npm --json reports errors on stdout as {"error": {"code", "summary"}}."""
    try:
        err = json.loads(r.stdout)["error"]
        return f"{err.get('code', '?')}: {err.get('summary', '')}"
    except (ValueError, KeyError, TypeError):
        return (r.stderr.strip().splitlines() or ["npm pack failed"])[-1]


def _npm_pack(specs, npm_dir: Path, log):
    """npm pack NAME@VERSION... into npm_dir (one node start for all); returns {spec: error}."""
    tmp = _fresh_tmp(npm_dir / "pack")
    tmp.mkdir()
    cmd = ["npm", "pack", "--json", "--silent", "--pack-destination", str(tmp)]
    log(f"npm pack {' '.join(specs)}")
    errors = {}
    if _run(cmd + specs, cwd=tmp).returncode != 0:
        for spec in specs:  # one by one, to tell which package failed
            r = _run(cmd + [spec], cwd=tmp)
            if r.returncode != 0:
                errors[spec] = _npm_error(r)
    for path in sorted(tmp.glob("*.tgz")):
        os.replace(path, npm_dir / path.name)
    shutil.rmtree(tmp)
    return errors


def fetch_npm(pins, cache: Path, log):
    """pins: {name: version}. npm versions are immutable, so pinning them fixes the text."""
    npm_dir = cache / "npm"
    npm_dir.mkdir(parents=True, exist_ok=True)
    # npm pack names '@scope/name@1.0' scope-name-1.0.tgz.
    tgzs = {name: npm_dir / f"{_safe(name)}-{version}.tgz" for name, version in pins.items()}
    missing = [f"{name}@{pins[name]}" for name in sorted(pins) if not tgzs[name].exists()]
    errors = {}
    if missing:
        if shutil.which("npm") is None:
            errors = {spec: "npm is not installed" for spec in missing}
        else:
            errors = _npm_pack(missing, npm_dir, log)
    result = {}
    for name, version in sorted(pins.items()):
        if not tgzs[name].exists():
            why = errors.get(f"{name}@{version}", "npm pack gave no tarball")
            result[name] = Fetched(error=f"{name}@{version}: {why}")
            continue
        root = cache / "x" / "npm" / f"{_safe(name)}-{version}"
        if not root.is_dir():
            root.parent.mkdir(parents=True, exist_ok=True)
            tmp = _fresh_tmp(root)
            _extract_tarball(tgzs[name], tmp)
            os.replace(tmp, root)
        result[name] = Fetched(root=root, version=version)
    return result


# ---- local -----------------------------------------------------------------------------------
def dpkg_version(name):
    r = _run(["dpkg-query", "-W", "-f", "${Version}", name])
    return r.stdout.strip() if r.returncode == 0 else ""


def fetch_local(ref: PackageRef):
    path = Path(ref.path)
    if not path.is_dir():
        return Fetched(error=f"{ref.name}: {path} does not exist on this machine")
    return Fetched(root=path, version=dpkg_version(ref.name) or "unknown")


def fetch_all(refs, cache: Path, log):
    """{PackageRef: Fetched} for every ref; never raises for a missing package (its error says why)."""
    refs = sorted(set(refs), key=lambda r: (r.registry, r.name))
    out = {}
    apt = [r for r in refs if r.registry == "apt"]
    if apt:
        if shutil.which("apt-get") is None:
            got = {r.name: Fetched(error=f"{r.name}: apt-get is not available") for r in apt}
        else:
            got = fetch_apt([r.name for r in apt], cache, log)
        out.update({r: got[r.name] for r in apt})
    npm = [r for r in refs if r.registry == "npm"]
    if npm:
        got = fetch_npm({r.name: r.version for r in npm}, cache, log)
        out.update({r: got[r.name] for r in npm})
    out.update({r: fetch_local(r) for r in refs if r.registry == "local"})
    return out

