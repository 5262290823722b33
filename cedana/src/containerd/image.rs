//! Images as containerd stores them: [`resolve`] follows an image's name to its manifest for this platform
//! (through an OCI index or a Docker manifest list), its configuration (`config` and `rootfs.diff_ids`), and
//! the [`chain_id`] of its layers, the snapshot its containers' root filesystems are prepared on.

use cedana::error::ErrorKind;
use serde::Deserialize;

use sha2::{Digest as _, Sha256};

use super::{Client, ContainerdError};

type Result<T> = std::result::Result<T, ContainerdError>;

/// The largest index, manifest or configuration read (real ones are a few KiB).
const MAX_METADATA: usize = 8 << 20;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The runtime configuration an image gives its containers (the `config` of its configuration JSON).
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

/// An image resolved for this platform.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// The image's name, as containerd knows it.
    pub name: String,
    pub config: ImageConfig,
    /// The chain id of its layers: the snapshot its containers are prepared on.
    pub chain_id: String,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

/// An index, a manifest list or a manifest: whichever fields are there.
#[derive(Deserialize)]
struct Root {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ImageConfig>,
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// The image `name` of the client's namespace, for this platform (linux and this machine's architecture).
pub fn resolve(client: &Client, name: &str) -> Result<Image> {
    let target = client.image(name)?;
    let mut digest = target.digest;
    let mut media_type = target.media_type;
    // An index may point at further indexes; a real image has one level.
    for _ in 0..4 {
        let root: Root = parse(&client.read_content(&digest, MAX_METADATA)?, name, &digest)?;
        if root.media_type.is_empty() {
            root.media_type.clone_into(&mut media_type);
        }
        let is_index = media_type == OCI_INDEX || media_type == DOCKER_LIST || root.manifests.is_some();
        if is_index {
            let manifests = root.manifests.unwrap_or_default();
            let chosen = pick_manifest(&manifests, GOARCH).ok_or_else(|| {
                ContainerdError::new(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "image {name} has no manifest for linux/{GOARCH} (its index {digest} lists {})",
                        platforms(&manifests)
                    ),
                )
            })?;
            digest = chosen.digest.clone();
            media_type = chosen.media_type.clone();
            continue;
        }
        let config = root.config.ok_or_else(|| {
            ContainerdError::new(
                ErrorKind::FailedPrecondition,
                format!("image {name}: {digest} ({media_type}) is neither an index nor a manifest with a config"),
            )
        })?;
        let file: ConfigFile = parse(&client.read_content(&config.digest, MAX_METADATA)?, name, &config.digest)?;
        if file.rootfs.diff_ids.is_empty() {
            return Err(ContainerdError::new(ErrorKind::FailedPrecondition, format!("image {name} has no layers")));
        }
        return Ok(Image {
            name: name.to_string(),
            config: file.config.unwrap_or_default(),
            chain_id: chain_id(&file.rootfs.diff_ids),
        });
    }
    Err(ContainerdError::new(ErrorKind::FailedPrecondition, format!("image {name}: indexes nested too deep")))
}

/// This machine's architecture in OCI's (Go's) words.
const GOARCH: &str = match std::env::consts::ARCH.as_bytes() {
    b"x86_64" => "amd64",
    b"aarch64" => "arm64",
    b"x86" => "386",
    b"powerpc64" => "ppc64le",
    _ => std::env::consts::ARCH,
};

/// The manifest of an index for linux/`arch`; an index of one manifest without a platform is taken as is.
fn pick_manifest<'a>(manifests: &'a [Descriptor], arch: &str) -> Option<&'a Descriptor> {
    manifests.iter().find(|m| m.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == arch)).or_else(|| {
        match manifests {
            [only] if only.platform.is_none() => Some(only),
            _ => None,
        }
    })
}

fn platforms(manifests: &[Descriptor]) -> String {
    let all: Vec<String> =
        manifests.iter().filter_map(|m| m.platform.as_ref()).map(|p| format!("{}/{}", p.os, p.architecture)).collect();
    if all.is_empty() {
        "no platforms".to_string()
    } else {
        all.join(", ")
    }
}

fn parse<T: serde::de::DeserializeOwned>(data: &[u8], name: &str, digest: &str) -> Result<T> {
    serde_json::from_slice(data)
        .map_err(|e| ContainerdError::new(ErrorKind::FailedPrecondition, format!("image {name}: reading blob {digest}: {e}")))
}

/// The chain id of layers with these diff ids (OCI image spec): the first layer's diff id, then
/// `sha256(chain id of the layers below + " " + diff id)` for each further layer.
pub fn chain_id(diff_ids: &[String]) -> String {
    let mut ids = diff_ids.iter();
    let Some(first) = ids.next() else { return String::new() };
    ids.fold(first.clone(), |chain, diff| format!("sha256:{}", hex_sha256(format!("{chain} {diff}").as_bytes())))
}

/// The lower-case hex SHA-256 of `data`.
fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4";
    const B: &str = "sha256:1f2a1eef8e2c8b6a0bf3ac4f6ed2da1ec50fc12f7bf8c0c4dbb7e0b4e2bb3d31";

    #[test]
    fn the_chain_id_of_one_layer_is_its_diff_id() {
        assert_eq!(chain_id(&[A.to_string()]), A);
        assert_eq!(chain_id(&[]), "");
    }

    #[test]
    fn chain_ids_hash_the_chain_below_with_each_layer() {
        let two = chain_id(&[A.to_string(), B.to_string()]);
        let expected = format!("sha256:{}", hex_sha256(format!("{A} {B}").as_bytes()));
        assert_eq!(two, expected);
        let three = chain_id(&[A.to_string(), B.to_string(), A.to_string()]);
        assert_eq!(three, format!("sha256:{}", hex_sha256(format!("{two} {A}").as_bytes())));
        assert_ne!(two, chain_id(&[B.to_string(), A.to_string()]), "the order of layers matters");
    }

    #[test]
    fn a_known_chain_id() {
        // Computed with `printf '%s' "$A $B" | sha256sum`.
        assert_eq!(
            chain_id(&[A.to_string(), B.to_string()]),
            "sha256:e546ecf9128b518646447a26fbb2a64eeef2e38e5962ea9af41d2d50f7bd6a35"
        );
    }

    #[test]
    fn the_manifest_for_this_platform_is_picked_from_an_index() {
        let index: Root = serde_json::from_str(
            r#"{"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
                {"mediaType":"m","digest":"sha256:arm","platform":{"architecture":"arm64","os":"linux"}},
                {"mediaType":"m","digest":"sha256:win","platform":{"architecture":"amd64","os":"windows"}},
                {"mediaType":"m","digest":"sha256:amd","platform":{"architecture":"amd64","os":"linux"}}]}"#,
        )
        .unwrap();
        let manifests = index.manifests.unwrap();
        assert_eq!(pick_manifest(&manifests, "amd64").unwrap().digest, "sha256:amd");
        assert_eq!(pick_manifest(&manifests, "arm64").unwrap().digest, "sha256:arm");
        assert!(pick_manifest(&manifests, "s390x").is_none());
        assert_eq!(platforms(&manifests), "linux/arm64, windows/amd64, linux/amd64");
        let single: Vec<Descriptor> = serde_json::from_str(r#"[{"digest":"sha256:one"}]"#).unwrap();
        assert_eq!(pick_manifest(&single, "amd64").unwrap().digest, "sha256:one");
    }

    #[test]
    fn image_configs_are_read_in_docker_case() {
        let file: ConfigFile = serde_json::from_str(
            r#"{"config":{"Env":["PATH=/bin"],"Cmd":["sh"],"Entrypoint":null,"WorkingDir":"/w","User":"1000"},
                "rootfs":{"type":"layers","diff_ids":["sha256:x"]}}"#,
        )
        .unwrap();
        let c = file.config.unwrap();
        assert_eq!(c.env, Some(vec!["PATH=/bin".to_string()]));
        assert_eq!(c.cmd, Some(vec!["sh".to_string()]));
        assert_eq!(c.entrypoint, None);
        assert_eq!(c.working_dir.as_deref(), Some("/w"));
        assert_eq!(c.user.as_deref(), Some("1000"));
        assert_eq!(file.rootfs.diff_ids, ["sha256:x"]);
    }
}
