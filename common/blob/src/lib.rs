//! The blobstore's client: streamed, verified put and get of content-addressed blobs.
