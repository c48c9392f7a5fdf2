//! The EC2 side of the AWS scenario in LocalStack (host mode), through the
//! Rust AWS SDK configured only by `AWS_ENDPOINT_URL_*`. LocalStack's
//! community build has no ELBv2; with `CNLB_LOCALSTACK_URL` pointing at a
//! LocalStack Pro, the NLB part runs there too.

mod common;

use cnlb_localstack_tests::Env;
use cnlb_provider_aws::Clients;

#[test]
fn vpc_subnets_and_eni_secondary_ips_in_localstack() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let env = Env::builder("aws-localstack")
            .localstack()
            .start()
            .await
            .unwrap();
        common::use_endpoints(&env.localstack().unwrap());
        let clients = Clients::from_env().await;
        let net = common::ec2_network(&clients).await;
        if cnlb_localstack_tests::aws::external_url().is_some() {
            common::nlb_with_ip_targets(&clients, &net).await;
        }
    });
}
