//! Through the Rust AWS SDK, configured only by `AWS_ENDPOINT_URL_*`: a VPC
//! with a secondary CIDR, subnets, an ENI with secondary IPs, an NLB, a
//! TargetType=ip target group and a listener, and registered targets, in moto
//! (or in the user's LocalStack Pro when `CNLB_LOCALSTACK_URL` is set).

mod common;

use cnlb_localstack_tests::Env;
use cnlb_provider_aws::Clients;

#[test]
fn vpc_eni_nlb_and_ip_targets_in_moto() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let env = Env::builder("aws-moto").moto().start().await.unwrap();
        common::use_endpoints(&env.aws().unwrap());
        let clients = Clients::from_env().await;
        let net = common::ec2_network(&clients).await;
        common::nlb_with_ip_targets(&clients, &net).await;
    });
}
