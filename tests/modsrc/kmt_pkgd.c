// SPDX-License-Identifier: GPL-2.0
/* kmt_pkgd: imports kmt_pkgc_hello (from kmt_pkgc) and _printk. */
#include <linux/init.h>
#include <linux/module.h>
#include <linux/printk.h>
#include "kmt_pkgc.h"

static int __init kmt_pkgd_init(void)
{
	int ret = kmt_pkgc_hello();

	pr_info("kmt_pkgd: loaded\n");
	return ret;
}

static void __exit kmt_pkgd_exit(void)
{
	pr_info("kmt_pkgd: unloaded\n");
}

module_init(kmt_pkgd_init);
module_exit(kmt_pkgd_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmodd test module: consumer of kmt_pkgc");
