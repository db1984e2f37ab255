#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbg_download() {
    let _ = tracing_subscriber::fmt().with_env_filter("debug,ipstack=trace").with_test_writer().try_init();
    tungate_testkit::mem::bulk_16mib_download_v4(backend_ipstack::Ipstack::default()).await;
}
