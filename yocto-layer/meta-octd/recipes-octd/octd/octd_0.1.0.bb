SUMMARY = "De-identify, classify and triage retinal OCT scans beside the scanner"
DESCRIPTION = "octd watches an OCT scanner's export folder, de-identifies every scan \
               (DICOM PS3.15 Annex E), classifies it (CNV, DME, DRUSEN, NORMAL) with a signed, \
               self-tested ONNX model, ranks it by urgency and publishes the result over MQTT."
HOMEPAGE = "https://octd.example.org"
BUGTRACKER = "https://octd.example.org/issues"
SECTION = "science"
CVE_PRODUCT = "octd"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://Cargo.toml;beginline=7;endline=7;md5=2507bd5f0713f05419cd2f22fa06fe62"

SRC_URI = "git://git.octd.example.org/octd.git;protocol=https;branch=main"
# Pin each release's commit; regenerate octd-crates.inc from that commit's Cargo.lock.
SRCREV = "1d73db561c10e44c39ee6fc49ab737ce22d32277"

require ${BPN}-crates.inc

inherit cargo cargo-update-recipe-crates systemd useradd

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --home-dir ${localstatedir}/lib/octd --no-create-home \
                       --shell ${base_sbindir}/nologin --user-group octd"
GROUPMEMS_PARAM:${PN} = "--add octd --group video"

SYSTEMD_SERVICE:${PN} = "octd.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/octd.service ${D}${systemd_system_unitdir}/octd.service

    install -d -m 0750 ${D}${sysconfdir}/octd
    install -m 0640 ${S}/config/octd-system.toml ${D}${sysconfdir}/octd/octd.toml
    install -m 0644 ${S}/models/channel/metadata/1.root.json ${D}${sysconfdir}/octd/root.json
    chgrp -R octd ${D}${sysconfdir}/octd

    install -d ${D}${datadir}/octd/channel/metadata ${D}${datadir}/octd/channel/targets ${D}${datadir}/octd/systemd
    install -m 0644 ${S}/models/channel/metadata/*.json ${D}${datadir}/octd/channel/metadata/
    install -m 0644 ${S}/models/channel/targets/* ${D}${datadir}/octd/channel/targets/
    install -m 0644 ${S}/systemd/octd-gpu.conf ${D}${datadir}/octd/systemd/

    install -d -m 0750 ${D}${servicedir}/octd/inbox
    chown -R octd:octd ${D}${servicedir}/octd
}

FILES:${PN} += "${servicedir}/octd"
CONFFILES:${PN} = "${sysconfdir}/octd/octd.toml ${sysconfdir}/octd/root.json"

RDEPENDS:${PN} = "ca-certificates"
# The ONNX Runtime backends load libonnxruntime.so at run time when it is installed
# (meta-tegra / JetPack's onnxruntime-gpu); without it octd runs on tract.
RRECOMMENDS:${PN} = "tzdata"
