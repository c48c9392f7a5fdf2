//! OCI images built without Docker or a registry: one uncompressed layer
//! holding a binary and the shared libraries it links, written as an OCI
//! image layout archive that `ctr images import` (or `skopeo copy
//! oci-archive:...`) takes. Every byte is determined by the inputs (sorted
//! entries, time 0, owner root), so the same binaries give the same digest.
//!
//! The Rust binaries link glibc dynamically (no musl target offline), so an
//! image carries the libraries `ldd` names, at the paths the binary asks
//! for, and the dynamic loader.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::paths::workspace_bin;

/// Tag of cnlb's images: the workspace version, as the charts' appVersion.
pub const TAG: &str = env!("CARGO_PKG_VERSION");
/// Where product images are named; users retag them for their registry.
pub const REPOSITORY: &str = "ghcr.io/cnlb";
/// Images only the local environment uses.
pub const LOCAL_REPOSITORY: &str = "localhost/cnlb";
/// The roots of trust the clouds' HTTPS endpoints are checked against.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// One file in an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageFile {
    /// Absolute path inside the image.
    pub path: String,
    pub source: PathBuf,
    pub mode: u32,
    /// Without symbols and debug information (`strip`): a debug build's
    /// binary halves.
    pub strip: bool,
}

/// What goes into an image.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// `repository/name:tag`.
    pub reference: String,
    pub files: Vec<ImageFile>,
    pub entrypoint: Vec<String>,
}

/// An image written as an OCI archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OciArchive {
    pub reference: String,
    /// `sha256:...` of the image manifest: what a registry names it by.
    pub digest: String,
    pub path: PathBuf,
}

impl ImageSpec {
    /// An image whose entrypoint is the first of `binaries`, each put in
    /// `/usr/local/bin` with the shared libraries it links.
    pub fn binaries(reference: &str, binaries: &[PathBuf]) -> Result<ImageSpec> {
        let mut files = BTreeMap::new();
        let mut entrypoint = Vec::new();
        for bin in binaries {
            let name = bin
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| format!("{} has no file name", bin.display()))?;
            let path = format!("/usr/local/bin/{name}");
            if entrypoint.is_empty() {
                entrypoint.push(path.clone());
            }
            for lib in shared_libraries(bin)? {
                files.insert(lib.path.clone(), lib);
            }
            files.insert(
                path.clone(),
                ImageFile {
                    path,
                    source: bin.clone(),
                    mode: 0o755,
                    strip: true,
                },
            );
        }
        if entrypoint.is_empty() {
            bail!("image {reference} needs a binary");
        }
        Ok(ImageSpec {
            reference: reference.to_string(),
            files: files.into_values().collect(),
            entrypoint,
        })
    }

    /// Adds the host's CA bundle, for images that call cloud APIs over HTTPS.
    pub fn with_ca_bundle(mut self) -> ImageSpec {
        if Path::new(CA_BUNDLE).is_file() {
            self.files.push(ImageFile {
                path: CA_BUNDLE.into(),
                source: CA_BUNDLE.into(),
                mode: 0o644,
                strip: false,
            });
        }
        self
    }
}

/// The images of cnlb's own components and of the local environment, from
/// the binaries of the running build (`cargo build --workspace --bins`).
pub fn workspace_images() -> Result<Vec<ImageSpec>> {
    let bin = |n: &str| workspace_bin(n);
    Ok(vec![
        ImageSpec::binaries(&ccm_image(), &[bin("cnlb-ccm")?])?.with_ca_bundle(),
        ImageSpec::binaries(
            &vpc_ipam_image(),
            &[bin("vpc-ipam-agent")?, bin("vpc-ipam")?],
        )?
        .with_ca_bundle(),
        ImageSpec::binaries(
            &format!("{REPOSITORY}/cnlb-onprem-haproxy:{TAG}"),
            &[bin("cnlb-onprem-haproxy")?],
        )?,
        ImageSpec::binaries(&pause_image(), &[bin("cnlb-pause")?])?,
        ImageSpec::binaries(&pod_server_image(), &[bin("cnlb-pod-server")?])?,
    ])
}

/// cnlb-ccm, as the cnlb-ccm chart names it.
pub fn ccm_image() -> String {
    format!("{REPOSITORY}/cnlb-ccm:{TAG}")
}

/// vpc-ipam-agent and the vpc-ipam plugin, as the cnlb-vpc-ipam chart names them.
pub fn vpc_ipam_image() -> String {
    format!("{REPOSITORY}/vpc-ipam:{TAG}")
}

/// The images of [`workspace_images`] named in `references`, written to
/// `$CNLB_CACHE/images` (each once per process): what the environment
/// imports into its Nodes.
pub fn workspace_archives(references: &[String]) -> Result<Vec<OciArchive>> {
    static WRITTEN: std::sync::Mutex<BTreeMap<String, OciArchive>> =
        std::sync::Mutex::new(BTreeMap::new());
    let dir = crate::paths::cache_dir().join("images");
    let mut written = WRITTEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let specs = workspace_images()?;
    let mut out = Vec::new();
    for reference in references {
        if let Some(a) = written.get(reference) {
            out.push(a.clone());
            continue;
        }
        let spec = specs
            .iter()
            .find(|s| &s.reference == reference)
            .with_context(|| format!("no image {reference} in this workspace"))?;
        let archive = write_archive(spec, &dir)?;
        written.insert(reference.clone(), archive.clone());
        out.push(archive);
    }
    Ok(out)
}

/// The Pod sandbox image the Nodes' containerd runs.
pub fn pause_image() -> String {
    format!("{LOCAL_REPOSITORY}/pause:{TAG}")
}

/// The sample app: `cnlb-pod-server`.
pub fn pod_server_image() -> String {
    format!("{LOCAL_REPOSITORY}/pod-server:{TAG}")
}

/// The shared libraries `binary` loads (by `ldd`), each at the path the
/// binary asks for, with the content of the file it resolves to.
pub fn shared_libraries(binary: &Path) -> Result<Vec<ImageFile>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary: "not a dynamic executable".
        if String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
            || text.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_ldd(&text)
        .into_iter()
        .map(|path| {
            let source = std::fs::canonicalize(&path)
                .with_context(|| format!("resolving {}", path.display()))?;
            Ok(ImageFile {
                path: path.display().to_string(),
                source,
                mode: 0o755,
                strip: false,
            })
        })
        .collect()
}

/// The library paths in `ldd` output: `name => /path (0x..)` and the
/// loader's `/path (0x..)`; the vDSO has no file.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Writes `spec` as `<dir>/<name>-<tag>.tar` (an OCI image layout
/// archive), unless an archive of the same content is there already.
pub fn write_archive(spec: &ImageSpec, dir: &Path) -> Result<OciArchive> {
    let layer = layer_tar(&spec.files)?;
    let layer_digest = sha256(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": spec.entrypoint,
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))?;
    let digest = sha256(&manifest);
    let tag = spec
        .reference
        .rsplit_once(':')
        .map(|(_, t)| t)
        .context("image reference without a tag")?;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": manifest.len(),
            "annotations": {
                // containerd names the imported image by this one ...
                "io.containerd.image.name": spec.reference,
                // ... and the OCI spec's tools by this one.
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))?;

    let file_name = spec
        .reference
        .rsplit('/')
        .next()
        .unwrap_or(&spec.reference)
        .replace(':', "-");
    let path = dir.join(format!("{file_name}.tar"));
    let archive = OciArchive {
        reference: spec.reference.clone(),
        digest: digest.clone(),
        path: path.clone(),
    };
    let stamp = dir.join(format!("{file_name}.digest"));
    if path.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&digest) {
        return Ok(archive);
    }
    let mut entries: Vec<(String, Vec<u8>)> = vec![
        (
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("index.json".into(), index),
        (blob_path(&digest), manifest),
        (blob_path(&config_digest), config),
        (blob_path(&layer_digest), layer),
    ];
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    std::fs::create_dir_all(dir)?;
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    {
        let mut tar = tar::Builder::new(std::io::BufWriter::new(tmp.as_file()));
        for dir_name in ["blobs/", "blobs/sha256/"] {
            tar.append(
                &header(dir_name, 0, 0o755, tar::EntryType::Directory)?,
                std::io::empty(),
            )?;
        }
        for (name, data) in &entries {
            let h = header(name, data.len() as u64, 0o644, tar::EntryType::Regular)?;
            tar.append(&h, data.as_slice())?;
        }
        tar.into_inner()?.flush()?;
    }
    tmp.persist(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::write(&stamp, &digest)?;
    Ok(archive)
}

fn blob_path(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A tar header with everything but the name, size, mode and type fixed.
fn header(path: &str, size: u64, mode: u32, kind: tar::EntryType) -> Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)
        .with_context(|| format!("tar entry {path}"))?;
    h.set_size(size);
    h.set_mode(mode);
    h.set_entry_type(kind);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    Ok(h)
}

/// The root filesystem: every parent directory, then the files, sorted; a
/// world-writable `/tmp`.
fn layer_tar(files: &[ImageFile]) -> Result<Vec<u8>> {
    let mut dirs = std::collections::BTreeSet::from(["tmp/".to_string()]);
    let mut sorted: Vec<&ImageFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for f in &sorted {
        let rel = f.path.trim_start_matches('/');
        let mut acc = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            acc.push_str(part);
            acc.push('/');
            dirs.insert(acc.clone());
        }
    }
    let mut tar = tar::Builder::new(Vec::new());
    for d in &dirs {
        let mode = if d == "tmp/" { 0o1777 } else { 0o755 };
        tar.append(
            &header(d, 0, mode, tar::EntryType::Directory)?,
            std::io::empty(),
        )?;
    }
    for f in sorted {
        let data = if f.strip {
            stripped(&f.source)?
        } else {
            std::fs::read(&f.source).with_context(|| format!("reading {}", f.source.display()))?
        };
        let h = header(
            f.path.trim_start_matches('/'),
            data.len() as u64,
            f.mode,
            tar::EntryType::Regular,
        )?;
        tar.append(&h, data.as_slice())?;
    }
    Ok(tar.into_inner()?)
}

/// `binary` without symbols and debug information (`strip -o`).
fn stripped(binary: &Path) -> Result<Vec<u8>> {
    let out = tempfile::NamedTempFile::new()?;
    let status = Command::new("strip")
        .arg("-o")
        .arg(out.path())
        .arg(binary)
        .status()
        .context("running strip (binutils)")?;
    if !status.success() {
        bail!("strip {} failed: {status}", binary.display());
    }
    Ok(std::fs::read(out.path())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn the_same_inputs_give_the_same_digest() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("tool");
        std::fs::write(&bin, b"#!/bin/true\n").unwrap();
        let spec = ImageSpec {
            reference: "localhost/cnlb/tool:1".into(),
            files: vec![ImageFile {
                path: "/usr/local/bin/tool".into(),
                source: bin.clone(),
                mode: 0o755,
                strip: false,
            }],
            entrypoint: vec!["/usr/local/bin/tool".into()],
        };
        let a = write_archive(&spec, &dir.path().join("a")).unwrap();
        let b = write_archive(&spec, &dir.path().join("b")).unwrap();
        assert_eq!(a.digest, b.digest);
        assert_eq!(
            std::fs::read(&a.path).unwrap(),
            std::fs::read(&b.path).unwrap()
        );
        std::fs::write(&bin, b"#!/bin/false\n").unwrap();
        let c = write_archive(&spec, &dir.path().join("a")).unwrap();
        assert_ne!(a.digest, c.digest);
    }
}
