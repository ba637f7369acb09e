//! De-identified images by content hash: a local folder on one node, S3-compatible storage
//! for a fleet (object_store, the Arrow project's client, behind one trait).

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    #[error("blob store: {0}")]
    Store(#[from] object_store::Error),
    #[error("blob store {0}: {1}")]
    Setup(String, String),
}

#[derive(Debug, Clone)]
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    location: String,
}

impl Blobs {
    /// `location`: a folder (created if missing) or `s3://bucket[/prefix]`; `s3_endpoint`
    /// for S3-compatible servers (plain http allowed there, for a server on the same host).
    pub fn open(location: &str, s3_endpoint: &str) -> Result<Blobs, BlobError> {
        let store: Arc<dyn ObjectStore> = match location.strip_prefix("s3://") {
            Some(rest) => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
                if !s3_endpoint.is_empty() {
                    builder = builder.with_endpoint(s3_endpoint).with_allow_http(s3_endpoint.starts_with("http://"));
                }
                let s3 = builder.build().map_err(|e| BlobError::Setup(location.into(), e.to_string()))?;
                let prefix = prefix.trim_matches('/');
                if prefix.is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
                }
            }
            None => {
                std::fs::create_dir_all(location).map_err(|e| BlobError::Setup(location.into(), e.to_string()))?;
                Arc::new(
                    LocalFileSystem::new_with_prefix(location)
                        .map_err(|e| BlobError::Setup(location.into(), e.to_string()))?,
                )
            }
        };
        Ok(Blobs { store, location: location.to_string() })
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    fn image_path(sha256: &str, extension: &str) -> ObjectPath {
        ObjectPath::from(format!("images/{}/{sha256}.{extension}", &sha256[..2.min(sha256.len())]))
    }

    /// Store an image under its hash. Writing the same bytes twice is harmless.
    pub async fn put_image(&self, sha256: &str, extension: &str, bytes: bytes::Bytes) -> Result<(), BlobError> {
        self.store.put(&Self::image_path(sha256, extension), PutPayload::from(bytes)).await?;
        Ok(())
    }

    pub async fn get_image(&self, sha256: &str, extension: &str) -> Result<Vec<u8>, BlobError> {
        let got = self.store.get(&Self::image_path(sha256, extension)).await?;
        Ok(got.bytes().await?.to_vec())
    }
}
