// SPDX-License-Identifier: GPL-2.0
/* kmt_misc: registers a misc device (imports misc_register/misc_deregister). */
#include <linux/fs.h>
#include <linux/init.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/printk.h>

static const struct file_operations kmt_misc_fops = {
	.owner = THIS_MODULE,
};

static struct miscdevice kmt_misc_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "kmt_misc",
	.fops = &kmt_misc_fops,
};

static int __init kmt_misc_init(void)
{
	int ret = misc_register(&kmt_misc_dev);

	if (ret)
		return ret;
	pr_info("kmt_misc: loaded\n");
	return 0;
}

static void __exit kmt_misc_exit(void)
{
	misc_deregister(&kmt_misc_dev);
}

module_init(kmt_misc_init);
module_exit(kmt_misc_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmodd test module: misc device registration");
