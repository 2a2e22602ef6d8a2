use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build free of system packages.
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let well_known = protoc_bin_vendored::include_path()?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // The protos stay at the repository root: the one place the API's shape
    // is defined, for every language.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let protos = [
        "keygate/v1/types.proto",
        "keygate/v1/authorizer.proto",
        "keygate/v1/admin.proto",
        "keygate/v1/feed.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("keygate_descriptor.bin"))
        .compile_with_config(
            config,
            &protos.map(|p| root.join(p)),
            &[root.clone(), well_known],
        )?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
