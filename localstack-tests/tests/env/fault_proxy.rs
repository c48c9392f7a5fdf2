//! The fault proxy (`cnlb_localstack_tests::fault_proxy`) in front of moto
//! and the GCE emulator answers like each cloud: the SDKs read its
//! throttles and 5xx as the real services' error codes, cnlb classifies
//! them as it would the real ones, latency is added, and a lost answer is
//! a call that happened while a reset before the call is one that did not.
//! With the account's documented limits on, calls past a bucket are
//! throttled, per bucket, until it refills.

#![allow(clippy::unwrap_used)]

use crate::common;

use cnlb_localstack_tests::Env;
use cnlb_localstack_tests::aws::AwsEndpoints;
use cnlb_localstack_tests::fault_proxy::{
    AccountLimits, Cloud, FaultProxy, Faults, Injected, Outcome,
};
use cnlb_provider_aws::ec2::error::ProvideErrorMetadata;
use cnlb_provider_aws::ec2::types::Filter;
use cnlb_provider_core::ProviderError;
use google_cloud_compute_v1::client::Instances;

fn always(kind: fn(&mut Faults)) -> Faults {
    let mut faults = Faults::default();
    kind(&mut faults);
    faults
}

#[test]
fn fault_proxy_answers_like_each_cloud() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let env = Env::builder("fault-proxy")
            .moto()
            .gce()
            .start()
            .await
            .unwrap();

        // AWS: EC2 and ELBv2 behind one proxy, as moto serves both.
        let moto = env.aws().unwrap();
        let proxy = FaultProxy::start(Cloud::Aws, &moto.ec2, 7).unwrap();
        let aws = common::clients_for(&AwsEndpoints::single(proxy.url())).await;
        let direct = common::clients_for(&moto).await;
        proxy.set_operation_faults("ec2:DescribeVpcs", always(|f| f.throttle = 1.0));
        proxy.set_operation_faults("ec2:DescribeSubnets", always(|f| f.server_error = 1.0));
        proxy.set_operation_faults("ec2:DescribeImages", always(|f| f.unavailable = 1.0));
        let err = aws.ec2.describe_vpcs().send().await.unwrap_err();
        assert_eq!(err.code(), Some("RequestLimitExceeded"), "{err:?}");
        let err = aws.ec2.describe_subnets().send().await.unwrap_err();
        assert_eq!(err.code(), Some("InternalError"), "{err:?}");
        let err = aws.ec2.describe_images().send().await.unwrap_err();
        assert_eq!(err.code(), Some("Unavailable"), "{err:?}");
        proxy.set_operation_faults("elbv2:DescribeLoadBalancers", always(|f| f.throttle = 1.0));
        let err = aws
            .elbv2
            .describe_load_balancers()
            .send()
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("Throttling"), "{err:?}");

        let slow = Faults {
            latency: std::time::Duration::from_millis(300),
            ..Faults::default()
        };
        proxy.set_operation_faults("ec2:DescribeRegions", slow);
        let started = std::time::Instant::now();
        aws.ec2.describe_regions().send().await.unwrap();
        assert!(started.elapsed().as_millis() >= 300, "latency added");

        // Connections dropped: before the call nothing happens; after it
        // the group exists though the caller never heard so.
        let vpc = direct
            .ec2
            .create_vpc()
            .cidr_block("10.9.0.0/16")
            .send()
            .await
            .unwrap();
        let vpc = vpc.vpc().unwrap().vpc_id().unwrap();
        let create = |name: &str| {
            aws.ec2
                .create_security_group()
                .group_name(name)
                .description("fault proxy test")
                .vpc_id(vpc)
                .send()
        };
        proxy.set_operation_faults("ec2:CreateSecurityGroup", always(|f| f.reset_before = 1.0));
        assert!(create("never-made").await.is_err());
        proxy.set_operation_faults("ec2:CreateSecurityGroup", always(|f| f.reset_after = 1.0));
        let err = create("made-unheard").await.unwrap_err();
        assert_eq!(err.code(), None, "a lost answer has no error code: {err:?}");
        let groups = |name: &'static str| {
            direct
                .ec2
                .describe_security_groups()
                .filters(Filter::builder().name("group-name").values(name).build())
                .send()
        };
        assert_eq!(
            groups("never-made").await.unwrap().security_groups().len(),
            0
        );
        assert_eq!(
            groups("made-unheard")
                .await
                .unwrap()
                .security_groups()
                .len(),
            1
        );
        let counts = proxy.counts();
        assert!(
            counts[&Outcome::Injected(Injected::Throttle)] >= 2,
            "{counts:?}"
        );
        assert!(counts[&Outcome::ResetBefore] >= 1, "{counts:?}");
        assert!(
            counts.keys().any(|o| matches!(o, Outcome::ResetAfter(200))),
            "{counts:?}"
        );

        // The account's documented limits, a tenth as large, and an SDK
        // that does not retry: EC2's unfiltered DescribeSecurityGroups
        // bucket holds 5 (refilling 1/s); with a filter it is another
        // bucket; ELBv2's registration bucket holds 2.
        let limited = FaultProxy::start(Cloud::Aws, &moto.ec2, 9).unwrap();
        limited.set_account_limits(Some(AccountLimits { scale: 0.1 }));
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(limited.url())
            .region(aws_config::Region::new(cnlb_localstack_tests::aws::REGION))
            .test_credentials()
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .load()
            .await;
        let ec2 = cnlb_provider_aws::ec2::Client::new(&config);
        let elbv2 = cnlb_provider_aws::elbv2::Client::new(&config);
        for _ in 0..5 {
            ec2.describe_security_groups().send().await.unwrap();
        }
        let err = ec2.describe_security_groups().send().await.unwrap_err();
        assert_eq!(err.code(), Some("RequestLimitExceeded"), "{err:?}");
        ec2.describe_security_groups()
            .filters(Filter::builder().name("vpc-id").values(vpc).build())
            .send()
            .await
            .unwrap();
        let register = || {
            elbv2
                .register_targets()
                .target_group_arn(
                    "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/none/0",
                )
                .send()
        };
        for _ in 0..2 {
            let err = register().await.unwrap_err();
            assert_ne!(err.code(), Some("Throttling"), "{err:?}");
        }
        let err = register().await.unwrap_err();
        assert_eq!(err.code(), Some("Throttling"), "{err:?}");
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        ec2.describe_security_groups().send().await.unwrap();
        assert_eq!(
            limited.counts()[&Outcome::Limited],
            2,
            "{}",
            limited.summary()
        );

        // GCE: 429 rateLimitExceeded and 403 userRateLimitExceeded are both
        // throttling to cnlb; 500 and 503 are worth retrying.
        let gce = env.gce().unwrap();
        let proxy = FaultProxy::start(Cloud::Gce, gce.endpoint(), 8).unwrap();
        let instances = Instances::builder()
            .with_endpoint(proxy.url())
            .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
            .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry)
            .build()
            .await
            .unwrap();
        let list = || {
            instances
                .list()
                .set_project(gce.project())
                .set_zone(&gce.zones()[0])
                .send()
        };
        list().await.unwrap();
        proxy.set_operation_faults("instances.list", always(|f| f.throttle = 1.0));
        let mut statuses = std::collections::BTreeSet::new();
        for _ in 0..12 {
            let err = list().await.unwrap_err();
            statuses.insert(err.http_status_code());
            let mapped = cnlb_provider_gcp::error::map("instances.list", &err);
            assert!(
                matches!(mapped, ProviderError::Throttled { .. }),
                "{mapped:?}"
            );
        }
        assert_eq!(
            statuses,
            [Some(403), Some(429)].into(),
            "both throttle shapes"
        );
        for (faults, status) in [
            (always(|f| f.server_error = 1.0), 500),
            (always(|f| f.unavailable = 1.0), 503),
        ] {
            proxy.set_operation_faults("instances.list", faults);
            let err = list().await.unwrap_err();
            assert_eq!(err.http_status_code(), Some(status));
            let mapped = cnlb_provider_gcp::error::map("instances.list", &err);
            assert!(
                matches!(
                    mapped,
                    ProviderError::Cloud {
                        retryable: true,
                        ..
                    }
                ),
                "{mapped:?}"
            );
        }
    });
}
